// CPU kernels compiled for the DEFAULT CPU capability, as the extension module
// lape_kernels._cpu_default (setup.py gives this file its ISA flags). lape_kernels._C imports the
// best module the machine supports; importing one registers its kernels for the CPU key.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels.h"

LAPE_KERNELS_REGISTER_CPU()
LAPE_KERNELS_PYINIT(_cpu_default)
