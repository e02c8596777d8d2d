;; imports a host function that is not WASI
(module
  (import "env" "host_secret" (func $s (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $s))))
