/* flipper: exchanges directory pairs back and forth without pause, for
 * bench/mix_swapdirs.sh and bench/hot_swapdirs/hot_swapdirs.sh.
 * usage: flipper PAUSE_US A1 B1 [A2 B2 ...]
 * Exchanges each pair a<->b in turn with renameat2(RENAME_EXCHANGE), in a
 * loop, sleeping PAUSE_US between two exchanges (0: none), until SIGTERM;
 * then prints "exchanges=N errors=E". Linux only. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#ifndef RENAME_EXCHANGE
#define RENAME_EXCHANGE (1 << 1)
#endif

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

/* usage: flipper PAUSE_US A1 B1 [A2 B2 ...] */
int main(int argc, char **argv) {
    if (argc < 4 || (argc - 2) % 2 != 0) {
        fprintf(stderr, "usage: flipper PAUSE_US A1 B1 [A2 B2 ...]\n");
        return 2;
    }
    long pause_us = atol(argv[1]);
    int npairs = (argc - 2) / 2;
    signal(SIGTERM, on_term);
    unsigned long long n = 0, errors = 0;
    for (int i = 0; !stop; i = (i + 1) % npairs) {
        const char *a = argv[2 + 2 * i], *b = argv[3 + 2 * i];
        /* raw syscall: works with any glibc */
        if (syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0)
            n++;
        else if (++errors == 1)
            perror("renameat2(RENAME_EXCHANGE)");
        if (pause_us > 0)
            usleep(pause_us);
    }
    printf("exchanges=%llu errors=%llu\n", n, errors);
    return 0;
}
