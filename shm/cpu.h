/* shm/cpu.h - a hint for spin loops (private to shm/). */
#ifndef SHOAL_CPU_H
#define SHOAL_CPU_H

/* Tells the CPU we are spinning, so it can yield to the other hyperthread. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif /* SHOAL_CPU_H */
