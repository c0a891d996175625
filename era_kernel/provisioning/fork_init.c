/* era-fork-init: the pid 1 of a forked kernel's sandbox (forked.py), once it has joined
 * the kernel's namespaces and dropped to the session's uid, capabilities, no_new_privs
 * and seccomp filter, all of which an exec keeps.
 *
 * Why a program of its own: init only waits, but as a copy of the zygote's Python it kept
 * some 3.9 MiB of private pages (PSS) a kernel, for nothing; exec'd, it keeps a few KiB.
 * It does what forked._init does: pass termination and interrupt signals to the kernel,
 * reap orphans, exit with the kernel's status (which ends everything in the namespace).
 *
 * The kernel's pid (in this namespace) comes in ERA_INIT_KERNEL. Built static by
 * scripts/setup.sh into <venv>/libexec/era-fork-init; without it forked.py keeps init in
 * Python (era doctor says so). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile pid_t kernel;

static void forward(int signum) {
    int saved = errno;
    if (kernel > 0)
        kill(kernel, signum);
    errno = saved;
}

int main(void) {
    static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    const char *given = getenv("ERA_INIT_KERNEL");
    struct sigaction action;
    size_t i;

    prctl(PR_SET_NAME, "era-fork-init", 0, 0, 0);  /* exec'd through a descriptor: named "3" otherwise */
    kernel = given ? (pid_t)atoi(given) : 0;
    memset(&action, 0, sizeof action);
    action.sa_handler = forward;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        sigaction(forwarded[i], &action, NULL);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            return 0;  /* no children left and no kernel named (ERA_INIT_KERNEL unset) */
        }
        if (pid == kernel && kernel > 0)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
}
