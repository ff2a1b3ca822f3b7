/*
 * In-place reduce-scatter, all-gather and reduce through the C API on a 64 MiB buffer
 * per rank, checking every element, and printing the peak RSS before and after:
 * in place, a collective needs its bounded scratch, not a copy of the message.
 *
 *   rank R: buffer 64 MiB, peak RSS before B KiB, after A KiB
 */
#include <hetccl.h>

#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>

#define CHECK(call)                                                                    \
  do {                                                                                 \
    if ((call) != hetcclSuccess) {                                                     \
      fprintf(stderr, "%s failed: %s\n", #call, hetcclGetLastError(NULL));              \
      return 1;                                                                        \
    }                                                                                  \
  } while (0)

static long peak_kib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

/* Rank r's element i: small integers, so sums are exact. */
static float val(int r, size_t i) { return (float)(r + (int)(i % 7)); }

static int wrong(const char* what, int rank, size_t i, float got, float want) {
  fprintf(stderr, "rank %d: %s element %zu is %g, expected %g\n", rank, what, i, got, want);
  return 1;
}

int main(void) {
  hetcclComm_t comm;
  int rank, n;
  CHECK(hetcclCommInitFromEnv(&comm));
  CHECK(hetcclCommUserRank(comm, &rank));
  CHECK(hetcclCommCount(comm, &n));
  size_t total = ((size_t)64 << 20) / sizeof(float), count = total / (size_t)n;
  float* buf = malloc(total * sizeof(float));
  if (!buf) return 1;
  for (size_t i = 0; i < total; i++) buf[i] = val(rank, i);
  long before = peak_kib();

  /* Reduce-scatter: this rank's block takes the sum, the others stay. */
  float* mine = buf + (size_t)rank * count;
  CHECK(hetcclReduceScatter(buf, mine, count, hetcclFloat32, hetcclSum, comm, NULL));
  for (size_t i = 0; i < count * (size_t)n; i++) {
    float want = val(rank, i);
    if (i / count == (size_t)rank) {
      want = 0;
      for (int r = 0; r < n; r++) want += val(r, i);
    }
    if (buf[i] != want) return wrong("in-place reduce_scatter", rank, i, buf[i], want);
  }
  /* All-gather: every rank's block from its own buffer. */
  for (size_t i = 0; i < count; i++) mine[i] = val(rank, i) * 2;
  CHECK(hetcclAllGather(mine, buf, count, hetcclFloat32, comm, NULL));
  for (size_t i = 0; i < count * (size_t)n; i++) {
    float want = val((int)(i / count), i % count) * 2;
    if (buf[i] != want) return wrong("in-place all_gather", rank, i, buf[i], want);
  }
  /* Reduce to the last rank. */
  int root = n - 1;
  for (size_t i = 0; i < total; i++) buf[i] = val(rank, i);
  CHECK(hetcclReduce(buf, rank == root ? buf : NULL, total, hetcclFloat32, hetcclMax, root, comm, NULL));
  for (size_t i = 0; i < total; i++) {
    float want = rank == root ? val(n - 1, i) : val(rank, i);
    if (buf[i] != want) return wrong("in-place reduce", rank, i, buf[i], want);
  }

  printf("rank %d: buffer %zu MiB, peak RSS before %ld KiB, after %ld KiB\n", rank,
         total * sizeof(float) >> 20, before, peak_kib());
  CHECK(hetcclCommDestroy(comm));
  free(buf);
  return 0;
}
