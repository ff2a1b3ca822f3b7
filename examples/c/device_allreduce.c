/*
 * device_allreduce: the C API's device collectives from a CUDA program, as an NCCL program
 * calls ncclAllReduce: device buffers from cudaMalloc, the program's own stream, and the
 * result read back on that stream. Each rank uses GPU LOCAL_RANK mod the number of GPUs
 * (ranks share a GPU when there are fewer). Exits 1 on a failed call or a wrong element.
 *
 *   hetccl run -n 2 -- ./device_allreduce [count]
 *
 * Build (libhetccl built with --features cuda):
 *   nvcc -x cu device_allreduce.c $(pkg-config --cflags --libs hetccl) -o device_allreduce
 * or any C compiler with CUDA's headers and -lcudart.
 */
#include <cuda_runtime.h>
#include <hetccl.h>

#include <stdio.h>
#include <stdlib.h>

static int rank = -1;

#define CHECK(call)                                                                   \
  do {                                                                                \
    hetcclResult_t r_ = (call);                                                       \
    if (r_ != hetcclSuccess) {                                                        \
      fprintf(stderr, "rank %d: %s failed: %s (%s)\n", rank, #call,                   \
              hetcclGetErrorString(r_), hetcclGetLastError(NULL));                    \
      exit(1);                                                                        \
    }                                                                                 \
  } while (0)

#define CUDA(call)                                                                    \
  do {                                                                                \
    cudaError_t e_ = (call);                                                          \
    if (e_ != cudaSuccess) {                                                          \
      fprintf(stderr, "rank %d: %s failed: %s\n", rank, #call, cudaGetErrorString(e_)); \
      exit(1);                                                                        \
    }                                                                                 \
  } while (0)

int main(int argc, char** argv) {
  size_t count = argc > 1 ? (size_t)strtoull(argv[1], NULL, 10) : (size_t)1 << 20;
  hetcclComm_t comm;
  CHECK(hetcclCommInitFromEnv(&comm));
  int nranks;
  CHECK(hetcclCommUserRank(comm, &rank));
  CHECK(hetcclCommCount(comm, &nranks));

  int gpus = 0;
  CUDA(cudaGetDeviceCount(&gpus));
  const char* lr = getenv("LOCAL_RANK");
  int device = (lr ? atoi(lr) : rank) % gpus;
  CUDA(cudaSetDevice(device));
  cudaStream_t stream;
  CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  hetcclDeviceComm_t dcomm;
  CHECK(hetcclDeviceCommInit(&dcomm, comm, device));

  /* Rank r contributes r + 1 + (i % 7) at element i. */
  float* host = (float*)malloc(count * sizeof(float));
  for (size_t i = 0; i < count; ++i) host[i] = (float)(rank + 1 + (int)(i % 7));
  float *send, *recv;
  CUDA(cudaMalloc((void**)&send, count * sizeof(float)));
  CUDA(cudaMalloc((void**)&recv, count * sizeof(float)));
  /* Queued on the stream: the all-reduce waits for the copy, and the copy back for it. */
  CUDA(cudaMemcpyAsync(send, host, count * sizeof(float), cudaMemcpyHostToDevice, stream));
  CHECK(hetcclDeviceAllReduce(send, recv, count, hetcclFloat, hetcclSum, dcomm, stream));
  CUDA(cudaMemcpyAsync(host, recv, count * sizeof(float), cudaMemcpyDeviceToHost, stream));
  CUDA(cudaStreamSynchronize(stream));

  long wrong = 0;
  float ranks_sum = (float)nranks * (nranks + 1) / 2;
  for (size_t i = 0; i < count; ++i) {
    float want = ranks_sum + (float)(nranks * (int)(i % 7));
    if (host[i] != want) {
      if (wrong == 0) fprintf(stderr, "rank %d: element %zu is %g, not %g\n", rank, i, host[i], want);
      ++wrong;
    }
  }
  printf("rank %d/%d: device all-reduce of %zu floats on GPU %d: %s\n", rank, nranks, count,
         device, wrong ? "WRONG" : "ok");

  CUDA(cudaFree(send));
  CUDA(cudaFree(recv));
  CUDA(cudaStreamDestroy(stream));
  free(host);
  CHECK(hetcclDeviceCommDestroy(dcomm));
  CHECK(hetcclCommDestroy(comm));
  return wrong ? 1 : 0;
}
