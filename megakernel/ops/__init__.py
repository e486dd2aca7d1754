"""Device code of the megakernel's stages, one module per stage: each holds its tile functions
(``tile_<verb>_<noun>``, usable on their own) and the task bodies that the persistent scheduler
(``megakernel.kernel``) runs: ``dispatch``, ``gemm`` (GEMM1 + SwiGLU, the down projection),
``combine`` (combine put, top-k reduce) and ``trace`` (the per-program task records)."""
