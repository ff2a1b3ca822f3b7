/*
 * uniqueid_init: NCCL-style initialisation with hetcclGetUniqueId + hetcclCommInitRank,
 * no launcher. Two ways to run N ranks on this host:
 *
 *   ./uniqueid_init fork N      one process per rank; rank 0 makes the id and writes
 *                               it down a pipe to every other rank (stands in for
 *                               MPI_Bcast or a shared file)
 *   ./uniqueid_init group N     one thread drives every rank: the N inits, then the
 *                               N all-reduces, each batch inside hetcclGroupStart/End
 *                               (NCCL's single-process, several-devices pattern)
 *
 * Each rank all-reduces (sum) a vector holding rank + i, checks n(n-1)/2 + n*i, and
 * exchanges a message with both neighbours. Exit status 0 when every rank passed.
 * Set MASTER_ADDR=127.0.0.1 to keep the bootstrap on loopback; otherwise the store
 * listens on the first non-loopback interface, as multi-host jobs need.
 *
 * Build: cc -std=c11 uniqueid_init.c $(pkg-config --cflags --libs hetccl) -o uniqueid_init
 */
#define _POSIX_C_SOURCE 200809L
#include <hetccl.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define COUNT 100000
#define MAX_RANKS 16

#define CHECK(who, call)                                                              \
  do {                                                                                \
    hetcclResult_t r_ = (call);                                                       \
    if (r_ != hetcclSuccess) {                                                        \
      fprintf(stderr, "%s: %s failed: %s (%s)\n", who, #call, hetcclGetErrorString(r_), \
              hetcclGetLastError(NULL));                                              \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

/* Fills rank r's input and the neighbour message. */
static void fill(int r, float* x, int* msg) {
  for (int i = 0; i < COUNT; i++) x[i] = (float)(r + i % 1000);
  *msg = 1000 + r;
}

/* Checks rank r's results after the all-reduce and the neighbour exchange. */
static int verify(int r, int n, const float* x, const int* from) {
  for (int i = 0; i < COUNT; i++) {
    float want = (float)(n * (n - 1) / 2 + n * (i % 1000));
    if (x[i] != want) {
      fprintf(stderr, "rank %d: element %d is %g, expected %g\n", r, i, (double)x[i], (double)want);
      return 1;
    }
  }
  int left = (r + n - 1) % n, right = (r + 1) % n;
  if (from[0] != 1000 + left || from[1] != 1000 + right) {
    fprintf(stderr, "rank %d: got %d from the left and %d from the right, expected %d and %d\n",
            r, from[0], from[1], 1000 + left, 1000 + right);
    return 1;
  }
  return 0;
}

/* Neighbour exchange: both directions, every rank sends first; the group makes it safe. */
static hetcclResult_t exchange(int r, int n, const int* msg, int* from, hetcclComm_t comm) {
  int left = (r + n - 1) % n, right = (r + 1) % n;
  hetcclResult_t res;
  if ((res = hetcclSend(msg, 1, hetcclInt32, right, comm, NULL)) != hetcclSuccess) return res;
  if ((res = hetcclSend(msg, 1, hetcclInt32, left, comm, NULL)) != hetcclSuccess) return res;
  if ((res = hetcclRecv(&from[0], 1, hetcclInt32, left, comm, NULL)) != hetcclSuccess) return res;
  return hetcclRecv(&from[1], 1, hetcclInt32, right, comm, NULL);
}

static int run_rank(int r, int n, hetcclUniqueId id) {
  char who[32];
  snprintf(who, sizeof who, "rank %d", r);
  static float x[COUNT];
  int msg, from[2] = {-1, -1};
  hetcclComm_t comm;
  CHECK(who, hetcclCommInitRank(&comm, n, id, r));
  fill(r, x, &msg);
  CHECK(who, hetcclAllReduce(x, x, COUNT, hetcclFloat32, hetcclSum, comm, NULL));
  CHECK(who, hetcclGroupStart());
  CHECK(who, exchange(r, n, &msg, from, comm));
  CHECK(who, hetcclGroupEnd());
  CHECK(who, hetcclCommDestroy(comm));
  if (verify(r, n, x, from)) return 1;
  printf("rank %d of %d: ok\n", r, n);
  return 0;
}

static int write_all(int fd, const void* p, size_t len) {
  const char* c = p;
  while (len > 0) {
    ssize_t k = write(fd, c, len);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    c += k;
    len -= (size_t)k;
  }
  return 0;
}

static int read_all(int fd, void* p, size_t len) {
  char* c = p;
  while (len > 0) {
    ssize_t k = read(fd, c, len);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    c += k;
    len -= (size_t)k;
  }
  return 0;
}

static int by_fork(int n) {
  int pipes[MAX_RANKS][2];
  pid_t pids[MAX_RANKS];
  for (int r = 0; r < n; r++)
    if (pipe(pipes[r]) != 0) { perror("pipe"); return 1; }
  for (int r = 0; r < n; r++) {
    pids[r] = fork();
    if (pids[r] < 0) { perror("fork"); return 1; }
    if (pids[r] > 0) continue;
    hetcclUniqueId id;
    if (r == 0) {
      /* Rank 0 makes the id and hands it to everyone else, like MPI_Bcast would. */
      CHECK("rank 0", hetcclGetUniqueId(&id));
      for (int j = 1; j < n; j++)
        if (write_all(pipes[j][1], &id, sizeof id) != 0) { perror("write id"); _exit(1); }
    } else if (read_all(pipes[r][0], &id, sizeof id) != 0) {
      perror("read id");
      _exit(1);
    }
    int rc = run_rank(r, n, id);
    fflush(stdout); /* _exit skips stdio's buffers */
    _exit(rc);
  }
  int failed = 0;
  for (int r = 0; r < n; r++) {
    int status = 0;
    if (waitpid(pids[r], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "rank %d failed (status %d)\n", r, status);
      failed = 1;
    }
  }
  return failed;
}

static int by_group(int n) {
  static float x[MAX_RANKS][COUNT];
  int msg[MAX_RANKS], from[MAX_RANKS][2];
  hetcclComm_t comms[MAX_RANKS];
  hetcclUniqueId id;
  CHECK("main", hetcclGetUniqueId(&id));
  /* Inside a group the inits run together at GroupEnd; outside, the first would wait
   * forever for ranks this thread has not created yet. */
  CHECK("main", hetcclGroupStart());
  for (int r = 0; r < n; r++) CHECK("main", hetcclCommInitRank(&comms[r], n, id, r));
  CHECK("main", hetcclGroupEnd());
  for (int r = 0; r < n; r++) {
    int got = -1;
    CHECK("main", hetcclCommUserRank(comms[r], &got));
    if (got != r) { fprintf(stderr, "comms[%d] says rank %d\n", r, got); return 1; }
    fill(r, x[r], &msg[r]);
    from[r][0] = from[r][1] = -1;
  }
  CHECK("main", hetcclGroupStart());
  for (int r = 0; r < n; r++) {
    CHECK("main", hetcclAllReduce(x[r], x[r], COUNT, hetcclFloat32, hetcclSum, comms[r], NULL));
    CHECK("main", exchange(r, n, &msg[r], from[r], comms[r]));
  }
  CHECK("main", hetcclGroupEnd());
  int failed = 0;
  for (int r = 0; r < n; r++) {
    CHECK("main", hetcclCommDestroy(comms[r]));
    failed |= verify(r, n, x[r], from[r]);
  }
  if (!failed) printf("%d ranks in one thread: ok\n", n);
  return failed;
}

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "fork";
  int n = argc > 2 ? atoi(argv[2]) : 2;
  if (n < 1 || n > MAX_RANKS) {
    fprintf(stderr, "usage: %s fork|group N   (1 <= N <= %d)\n", argv[0], MAX_RANKS);
    return 2;
  }
  if (strcmp(mode, "fork") == 0) return by_fork(n);
  if (strcmp(mode, "group") == 0) return by_group(n);
  fprintf(stderr, "unknown mode %s (fork or group)\n", mode);
  return 2;
}
