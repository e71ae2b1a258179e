/* Fault injection for tests/test_listener.py, loaded with LD_PRELOAD into a real server:
 * while the file named by FAULT_ACCEPT_FILE exists, the next accept4() removes it and fails
 * with the errno written in it, as the kernel's accept does when a connection's network
 * fails during its handshake (ENETUNREACH, EHOSTUNREACH, EPROTO), a firewall refuses it
 * (EPERM) or memory is short (ENOBUFS, ENOMEM). The connection stays queued for the next
 * call. Each injected failure is said on stderr, so the test knows it happened. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    const char *path = getenv("FAULT_ACCEPT_FILE");
    FILE *file = path ? fopen(path, "r") : NULL;
    if (file) {
        int code = 0;
        int read = fscanf(file, "%d", &code);
        fclose(file);
        if (read == 1 && code > 0 && unlink(path) == 0) {
            fprintf(stderr, "fault: accept4 fails with errno %d\n", code);
            errno = code;
            return -1;
        }
    }
    return real(fd, addr, len, flags);
}
