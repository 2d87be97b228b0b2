"""The kernel room: the ``lape_kernels`` custom ops (``ops``), their plain-PyTorch oracle
(``reference``), the argument checks every backend shares (``checks``) and the Triton kernels
(``triton_elementwise``, ``triton_gemm``; imported only when CUDA tensors need them)."""
