/* Part of bun_ep.h (included inside its extern "C" block); see the rules there. */
#ifndef BUN_EP_NVSHMEM_H
#define BUN_EP_NVSHMEM_H
#endif
