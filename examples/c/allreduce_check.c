/*
 * allreduce_check: runs every hetccl collective on several datatypes and counts and
 * checks each result against a closed form. Exits 1 on the first wrong element or
 * failed call. Start one process per rank:
 *
 *   hetccl run -n 4 -- ./allreduce_check
 *   mpirun -n 2 -x MASTER_ADDR=127.0.0.1 -x MASTER_PORT=29500 ./allreduce_check
 *   RANK=0 WORLD_SIZE=1 ./allreduce_check
 *
 * Build:  cc -std=c11 allreduce_check.c $(pkg-config --cflags --libs hetccl) -o allreduce_check
 *
 * Buffers are handled through one element accessor (put/get as double), so every
 * datatype runs the same code; values are small integers (and halves, for Avg), exact
 * in every type including float16.
 */
#include <hetccl.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                   \
  do {                                                                                \
    hetcclResult_t r_ = (call);                                                       \
    if (r_ != hetcclSuccess) {                                                        \
      fprintf(stderr, "rank %d: %s failed: %s (%s)\n", rank, #call,                   \
              hetcclGetErrorString(r_), hetcclGetLastError(NULL));                    \
      exit(1);                                                                        \
    }                                                                                 \
  } while (0)

static int rank, nranks;
static long checks;

/* IEEE binary16 <-> float for the values used here (exact, no subnormals needed). */
static uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if ((x & 0x7fffffffu) == 0) return (uint16_t)sign;
  if (exp <= 0 || exp >= 31) {
    fprintf(stderr, "value %g is out of this example's float16 range\n", (double)f);
    exit(1);
  }
  /* Round to nearest even on the 13 dropped mantissa bits. */
  uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) half++;
  return (uint16_t)half;
}

static float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t x = sign;
  if (exp != 0) x |= ((exp - 15 + 127) << 23) | (mant << 13);
  else if (mant != 0) { /* subnormal: not produced by this program */
    float f = (float)mant / 1024.0f / 16384.0f;
    return sign ? -f : f;
  }
  float f;
  memcpy(&f, &x, 4);
  return f;
}

static size_t type_size(hetcclDataType_t t) {
  switch (t) {
    case hetcclFloat16: return 2;
    case hetcclFloat32: case hetcclInt32: return 4;
    case hetcclFloat64: return 8;
    default: return 0;
  }
}

static const char* type_name(hetcclDataType_t t) {
  switch (t) {
    case hetcclFloat16: return "float16";
    case hetcclFloat32: return "float32";
    case hetcclFloat64: return "float64";
    case hetcclInt32: return "int32";
    default: return "?";
  }
}

static void put(void* buf, size_t i, hetcclDataType_t t, double v) {
  switch (t) {
    case hetcclFloat16: ((uint16_t*)buf)[i] = f32_to_f16((float)v); break;
    case hetcclFloat32: ((float*)buf)[i] = (float)v; break;
    case hetcclFloat64: ((double*)buf)[i] = v; break;
    case hetcclInt32: ((int32_t*)buf)[i] = (int32_t)v; break;
    default: break;
  }
}

static double get(const void* buf, size_t i, hetcclDataType_t t) {
  switch (t) {
    case hetcclFloat16: return f16_to_f32(((const uint16_t*)buf)[i]);
    case hetcclFloat32: return ((const float*)buf)[i];
    case hetcclFloat64: return ((const double*)buf)[i];
    case hetcclInt32: return ((const int32_t*)buf)[i];
    default: return 0;
  }
}

/* Rank r's input element i for collective-specific patterns. */
static double val(int r, size_t i) { return (double)(r + (int)(i % 13)); }

/* `v` rounded to type t, as the library's result is (Avg on 3 ranks is inexact). */
static double in_type(double v, hetcclDataType_t t) {
  double slot;
  put(&slot, 0, t, v);
  return get(&slot, 0, t);
}

static void expect(const char* what, hetcclDataType_t t, size_t count, const void* buf,
                   size_t i, double want) {
  double got = get(buf, i, t);
  want = in_type(want, t);
  checks++;
  if (got != want) {
    fprintf(stderr, "rank %d: %s %s count %zu: element %zu is %g, expected %g\n", rank, what,
            type_name(t), count, i, got, want);
    exit(1);
  }
}

static void* alloc(size_t n, hetcclDataType_t t) {
  void* p = calloc(n ? n : 1, type_size(t));
  if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
  return p;
}

static double expected_reduce(hetcclRedOp_t op, hetcclDataType_t t, size_t i) {
  double sum = 0, prod = 1, mx = -1e300, mn = 1e300;
  for (int r = 0; r < nranks; r++) {
    double v = val(r, i);
    double p = ((r + (int)i) % 3 == 0) ? 2 : 1;
    sum += v; prod *= p;
    if (v > mx) mx = v;
    if (v < mn) mn = v;
  }
  switch (op) {
    case hetcclSum: return sum;
    case hetcclProd: return prod;
    case hetcclMax: return mx;
    case hetcclMin: return mn;
    case hetcclAvg: return t == hetcclInt32 ? (double)((long)sum / nranks) : sum / nranks;
    default: return 0;
  }
}

static void fill_reduce_input(void* buf, size_t count, hetcclRedOp_t op, hetcclDataType_t t) {
  for (size_t i = 0; i < count; i++)
    put(buf, i, t, op == hetcclProd ? (((rank + (int)i) % 3 == 0) ? 2 : 1) : val(rank, i));
}

static void check_all_reduce(hetcclDataType_t t, size_t count, hetcclComm_t comm) {
  static const hetcclRedOp_t ops[] = {hetcclSum, hetcclProd, hetcclMax, hetcclMin, hetcclAvg};
  static const char* names[] = {"all_reduce sum", "all_reduce prod", "all_reduce max",
                                "all_reduce min", "all_reduce avg"};
  void* send = alloc(count, t);
  void* recv = alloc(count, t);
  for (int k = 0; k < 5; k++) {
    fill_reduce_input(send, count, ops[k], t);
    CHECK(hetcclAllReduce(send, recv, count, t, ops[k], comm, NULL));
    for (size_t i = 0; i < count; i++) expect(names[k], t, count, recv, i, expected_reduce(ops[k], t, i));
  }
  /* In place. */
  fill_reduce_input(recv, count, hetcclSum, t);
  CHECK(hetcclAllReduce(recv, recv, count, t, hetcclSum, comm, NULL));
  for (size_t i = 0; i < count; i++)
    expect("in-place all_reduce", t, count, recv, i, expected_reduce(hetcclSum, t, i));
  free(send);
  free(recv);
}

static void check_reduce_scatter(hetcclDataType_t t, size_t count, hetcclComm_t comm) {
  size_t total = count * (size_t)nranks;
  void* send = alloc(total, t);
  void* recv = alloc(count, t);
  for (size_t j = 0; j < total; j++) put(send, j, t, val(rank, j));
  CHECK(hetcclReduceScatter(send, recv, count, t, hetcclSum, comm, NULL));
  for (size_t i = 0; i < count; i++)
    expect("reduce_scatter", t, count, recv, i, expected_reduce(hetcclSum, t, (size_t)rank * count + i));
  /* In place: this rank's block of the send buffer is the receive buffer. */
  for (size_t j = 0; j < total; j++) put(send, j, t, val(rank, j));
  void* mine = (char*)send + (size_t)rank * count * type_size(t);
  CHECK(hetcclReduceScatter(send, mine, count, t, hetcclMax, comm, NULL));
  for (size_t i = 0; i < count; i++)
    expect("in-place reduce_scatter", t, count, mine, i, expected_reduce(hetcclMax, t, (size_t)rank * count + i));
  /* The other blocks are only read. */
  for (size_t j = 0; j < total; j++)
    if (j / count != (size_t)rank) expect("in-place reduce_scatter, other blocks", t, total, send, j, val(rank, j));
  free(send);
  free(recv);
}

static void check_all_gather(hetcclDataType_t t, size_t count, hetcclComm_t comm) {
  size_t total = count * (size_t)nranks;
  void* send = alloc(count, t);
  void* recv = alloc(total, t);
  for (size_t i = 0; i < count; i++) put(send, i, t, 3 * rank + (double)(i % 7));
  CHECK(hetcclAllGather(send, recv, count, t, comm, NULL));
  for (int b = 0; b < nranks; b++)
    for (size_t i = 0; i < count; i++)
      expect("all_gather", t, count, recv, (size_t)b * count + i, 3 * b + (double)(i % 7));
  /* In place: this rank's contribution already sits at its block. */
  memset(recv, 0, total * type_size(t));
  void* mine = (char*)recv + (size_t)rank * count * type_size(t);
  for (size_t i = 0; i < count; i++) put(mine, i, t, 5 * rank + (double)(i % 3));
  CHECK(hetcclAllGather(mine, recv, count, t, comm, NULL));
  for (int b = 0; b < nranks; b++)
    for (size_t i = 0; i < count; i++)
      expect("in-place all_gather", t, count, recv, (size_t)b * count + i, 5 * b + (double)(i % 3));
  free(send);
  free(recv);
}

static void check_broadcast_and_reduce(hetcclDataType_t t, size_t count, hetcclComm_t comm) {
  int root = nranks - 1;
  void* send = alloc(count, t);
  void* recv = alloc(count, t);
  for (size_t i = 0; i < count; i++) {
    put(send, i, t, 5 * rank + (double)(i % 11));
    put(recv, i, t, 0);
  }
  /* Out of place on the root; sendbuff is ignored (NULL is fine) elsewhere. */
  CHECK(hetcclBroadcast(rank == root ? send : NULL, recv, count, t, root, comm, NULL));
  for (size_t i = 0; i < count; i++)
    expect("broadcast", t, count, recv, i, 5 * root + (double)(i % 11));

  fill_reduce_input(send, count, hetcclSum, t);
  for (size_t i = 0; i < count; i++) put(recv, i, t, -1);
  CHECK(hetcclReduce(send, rank == 0 ? recv : NULL, count, t, hetcclSum, 0, comm, NULL));
  if (rank == 0)
    for (size_t i = 0; i < count; i++) expect("reduce", t, count, recv, i, expected_reduce(hetcclSum, t, i));

  /* In place on the root (sendbuff == recvbuff); the others' buffers are only read. */
  fill_reduce_input(send, count, hetcclMax, t);
  CHECK(hetcclReduce(send, rank == root ? send : NULL, count, t, hetcclMax, root, comm, NULL));
  for (size_t i = 0; i < count; i++)
    expect("in-place reduce", t, count, send, i, rank == root ? expected_reduce(hetcclMax, t, i) : val(rank, i));
  free(send);
  free(recv);
}

/* Ring shift inside a group: send to the right, receive from the left. Every rank
 * sends first; the group must still not deadlock, also for large counts. */
static void check_send_recv(hetcclDataType_t t, size_t count, hetcclComm_t comm) {
  if (nranks < 2) return;
  int right = (rank + 1) % nranks, left = (rank + nranks - 1) % nranks;
  void* send = alloc(count, t);
  void* recv = alloc(count, t);
  for (size_t i = 0; i < count; i++) put(send, i, t, 2 * rank + (double)(i % 5));
  CHECK(hetcclGroupStart());
  CHECK(hetcclSend(send, count, t, right, comm, NULL));
  CHECK(hetcclRecv(recv, count, t, left, comm, NULL));
  CHECK(hetcclGroupEnd());
  for (size_t i = 0; i < count; i++) expect("send/recv ring", t, count, recv, i, 2 * left + (double)(i % 5));
  free(send);
  free(recv);
}

int main(void) {
  hetcclComm_t comm;
  rank = -1;
  CHECK(hetcclCommInitFromEnv(&comm));
  CHECK(hetcclCommUserRank(comm, &rank));
  CHECK(hetcclCommCount(comm, &nranks));

  static const hetcclDataType_t types[] = {hetcclFloat32, hetcclFloat64, hetcclInt32, hetcclFloat16};
  /* 0 moves nothing; 1 and 7 are smaller than a rank per element; 1 << 18 spans many
   * pipeline chunks (and more than the shm ring / socket buffers for send/recv). */
  static const size_t counts[] = {0, 1, 7, 1000, 1 << 18};
  for (size_t ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
    for (size_t ci = 0; ci < sizeof counts / sizeof counts[0]; ci++) {
      hetcclDataType_t t = types[ti];
      size_t count = counts[ci];
      check_all_reduce(t, count, comm);
      check_reduce_scatter(t, count, comm);
      check_all_gather(t, count, comm);
      check_broadcast_and_reduce(t, count, comm);
      check_send_recv(t, count, comm);
    }
  }
  CHECK(hetcclCommDestroy(comm));
  printf("rank %d of %d: %ld checks passed\n", rank, nranks, checks);
  return 0;
}
