"""The process's resources, below every stage: the memory budget and resident-set measurements (:mod:`.budget`),
glibc's allocator hold (:mod:`.allocator`), BLAS threads (:mod:`.blas`) and the torch.distributed job
(:mod:`.distributed`). Imports nothing from the rest of ``landscape`` but :mod:`landscape.errors`."""
