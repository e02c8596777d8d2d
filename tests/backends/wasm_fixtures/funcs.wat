;; a module with exported functions (no _start): add, fmul, counter (global state), spin
(module
  (memory (export "memory") 1)
  (global $n (mut i32) (i32.const 0))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "fmul") (param f64 f64) (result f64) (f64.mul (local.get 0) (local.get 1)))
  (func (export "counter") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (global.get $n))
  (func (export "spin") (loop (br 0))))
