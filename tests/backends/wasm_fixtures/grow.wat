;; memory bomb: grow one 64 KiB page at a time until memory.grow fails; exit 3 when it failed
;; (the cap held), exit 0 if 65536 pages (4 GiB) were obtained
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (block $failed
      (loop $more
        (br_if $failed (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br_if $more (i32.lt_u (memory.size) (i32.const 65535)))))
    (call $exit (select (i32.const 3) (i32.const 0) (i32.lt_u (memory.size) (i32.const 65535))))))
