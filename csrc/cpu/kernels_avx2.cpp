// CPU kernels compiled for the AVX2 CPU capability, as the extension module
// lape_kernels._cpu_avx2 (setup.py gives this file its ISA flags). lape_kernels._C imports the
// best module the machine supports; importing one registers its kernels for the CPU key.
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"

LAPE_KERNELS_REGISTER_CPU()
LAPE_KERNELS_PYINIT(_cpu_avx2)
