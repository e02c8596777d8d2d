;; initial linear memory of 20000 pages (1.25 GiB): over a 512 MiB cap before anything runs
(module
  (memory (export "memory") 20000)
  (func (export "_start")))
