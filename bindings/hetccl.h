/*
 * hetccl.h - C API of hetccl, collective communication for data-parallel training on
 * heterogeneous clusters. Link with -lhetccl (pkg-config --cflags --libs hetccl).
 *
 * The API follows NCCL's, so a port is mostly renaming nccl -> hetccl; where it differs
 * (streams, unique id, groups, environment) see docs/nccl-migration.md.
 *
 * Buffers are host memory and every call is synchronous: when a collective returns,
 * the receive buffer holds the result. The stream argument must be NULL. Device buffers
 * go through the hetcclDevice* calls at the end, ordered on a CUDA stream.
 *
 * Every function returns a hetcclResult_t; on failure hetcclGetLastError() returns a
 * message naming the call, the rank, the peer and the collective where relevant.
 *
 * This header is checked against the library by tests/capi_header.rs: every function
 * declared here is exported by libhetccl.so and the other way round, and every enum
 * value and struct size matches the Rust definitions in src/capi/.
 */
#ifndef HETCCL_H_
#define HETCCL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define HETCCL_MAJOR 0
#define HETCCL_MINOR 1
#define HETCCL_PATCH 0
/* As returned by hetcclGetVersion: major * 10000 + minor * 100 + patch. */
#define HETCCL_VERSION_CODE (HETCCL_MAJOR * 10000 + HETCCL_MINOR * 100 + HETCCL_PATCH)

#define HETCCL_UNIQUE_ID_BYTES 128

/* A communicator handle. A token, not a pointer to memory: a destroyed handle is
 * recognised and refused with hetcclInvalidArgument. */
typedef struct hetcclComm* hetcclComm_t;

/* Made by hetcclGetUniqueId on rank 0, passed unchanged to every rank (MPI_Bcast, a
 * file, a pipe). It contains the job's secret key: keep it within the job. */
typedef struct {
  char internal[HETCCL_UNIQUE_ID_BYTES];
} hetcclUniqueId;

/* Values 0..7 equal NCCL's ncclResult_t. */
typedef enum {
  hetcclSuccess = 0,
  hetcclUnhandledCudaError = 1, /* GPU, driver or kernel launch failed (cuda builds) */
  hetcclSystemError = 2,        /* sockets, shared memory, files, bootstrap store */
  hetcclInternalError = 3,      /* a defect in hetccl; the message says where */
  hetcclInvalidArgument = 4,    /* NULL buffer, bad enum, bad rank, dead handle, stream */
  hetcclInvalidUsage = 5,       /* ranks disagree, comm used after failure, bad env */
  hetcclRemoteError = 6,        /* a peer died, aborted or misbehaved */
  hetcclInProgress = 7,         /* reserved */
  hetcclTimeout = 8,            /* no progress within HETCCL_TIMEOUT; message names the peer */
  hetcclNumResults = 9
} hetcclResult_t;

typedef enum {
  hetcclInt8 = 0,
  hetcclChar = 0,
  hetcclUint8 = 1,
  hetcclInt32 = 2,
  hetcclInt = 2,
  hetcclUint32 = 3,
  hetcclInt64 = 4,
  hetcclUint64 = 5,
  hetcclFloat16 = 6, /* IEEE binary16, reduced in float and rounded once per step */
  hetcclHalf = 6,
  hetcclFloat32 = 7,
  hetcclFloat = 7,
  hetcclFloat64 = 8,
  hetcclDouble = 8,
  hetcclBfloat16 = 9,
  hetcclNumTypes = 10
} hetcclDataType_t;

typedef enum {
  hetcclSum = 0,
  hetcclProd = 1,
  hetcclMax = 2,
  hetcclMin = 3,
  hetcclAvg = 4, /* sum / nranks; integer division for integer types */
  hetcclNumOps = 5
} hetcclRedOp_t;

/* A cudaStream_t (CUstream). Must be NULL in the host collectives; the device ones
 * order their work on it (NULL: the legacy default stream). */
typedef void* hetcclStream_t;

/* Library version as HETCCL_VERSION_CODE encodes it. */
hetcclResult_t hetcclGetVersion(int* version);

/* On the future rank 0: a new job id. The bootstrap store will listen on MASTER_ADDR /
 * MASTER_PORT when set, else on this host's address (HETCCL_SOCKET_IFNAME's, else the
 * first non-loopback interface) and a port free now. */
hetcclResult_t hetcclGetUniqueId(hetcclUniqueId* uniqueId);

/* hetcclGetUniqueId for programs with a rendezvous of their own (PyTorch's store, which
 * already holds MASTER_PORT): the store will listen on host (NULL: MASTER_ADDR, else as
 * hetcclGetUniqueId picks) and port (0: a port free now). keyFromEnv != 0: the id carries
 * no key, every rank must have the same HETCCL_JOB_KEY, and the id may then travel over
 * channels others can read; 0: the id holds a fresh key and must be kept within the job. */
hetcclResult_t hetcclGetUniqueIdAt(hetcclUniqueId* uniqueId, const char* host, int port,
                                   int keyFromEnv);

/* Creates rank `rank` of `nranks`. Blocks until all ranks have called it; inside
 * hetcclGroupStart/End it runs at hetcclGroupEnd, so one thread may create several
 * ranks. Other settings come from the HETCCL_* environment. */
hetcclResult_t hetcclCommInitRank(hetcclComm_t* comm, int nranks, hetcclUniqueId commId, int rank);

/* hetcclCommInitRank with settings of this communicator's own: NULL or "HETCCL_NAME=value"
 * lines separated by newlines, e.g. "HETCCL_COMPRESS=all\nHETCCL_COMPRESS_FORMAT=bf16",
 * taking precedence over the environment and checked as it is (HETCCL_JOB_KEY and
 * HETCCL_JOB_ID are refused: the id carries the job). */
hetcclResult_t hetcclCommInitRankSettings(hetcclComm_t* comm, int nranks,
                                          hetcclUniqueId commId, int rank,
                                          const char* settings);

/* Creates this process's communicator from its environment: `hetccl run`, torchrun
 * (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), mpirun (OMPI_COMM_WORLD_* plus
 * MASTER_ADDR/MASTER_PORT), PMI, Slurm, or HETCCL_INIT=file:///shared/dir. */
hetcclResult_t hetcclCommInitFromEnv(hetcclComm_t* comm);

/* Splits `comm`, as ncclCommSplit (no config argument: the new communicators take
 * comm's settings). Every rank of `comm` calls it; ranks passing the same `color` (0 or
 * more) get a new communicator, ranked by `key`, then by their rank in `comm`; a rank
 * passing HETCCL_SPLIT_NOCOLOR gets NULL. Blocks until the new communicators are up.
 * The new job's key is derived from comm's, never sent. Not inside a group. */
#define HETCCL_SPLIT_NOCOLOR (-1)
hetcclResult_t hetcclCommSplit(hetcclComm_t comm, int color, int key, hetcclComm_t* newcomm);

/* Releases a communicator; its handle is refused afterwards. */
hetcclResult_t hetcclCommDestroy(hetcclComm_t comm);
/* Releases a communicator after an error (calls are synchronous: nothing to cancel). */
hetcclResult_t hetcclCommAbort(hetcclComm_t comm);

hetcclResult_t hetcclCommCount(const hetcclComm_t comm, int* count);
hetcclResult_t hetcclCommUserRank(const hetcclComm_t comm, int* rank);
/* A communicator's counters since its initialisation (what HETCCL_DEBUG=info also logs
 * when it is destroyed). Bytes are payload bytes; times are nanoseconds. */
typedef struct {
  uint64_t calls;              /* calls run, failed ones included */
  uint64_t failed_calls;
  uint64_t shared_calls;       /* run on shared memory without links (eager, shared buffers) */
  uint64_t shared_bytes;       /* payload bytes of those */
  uint64_t bytes_sent_shm;     /* over shared-memory links */
  uint64_t bytes_sent_tcp;
  uint64_t bytes_received_shm;
  uint64_t bytes_received_tcp;
  uint64_t ns_total;           /* time inside collectives; the phases below add up to it */
  uint64_t ns_other;           /* outside named phases (trees, doubling, copies) */
  uint64_t ns_reduce_scatter;  /* a flat ring's reduce-scatter */
  uint64_t ns_all_gather;      /* a flat ring's all-gather */
  uint64_t ns_intra_reduce_scatter; /* hierarchical: inside the node */
  uint64_t ns_inter_all_reduce;     /* hierarchical: across nodes */
  uint64_t ns_intra_all_gather;     /* hierarchical: inside the node */
  uint64_t retries;            /* connection attempts link setup repeated */
  uint64_t compress_overflows; /* values saturated to the wire format's largest */
  uint64_t compress_nonfinite; /* inf and NaN met by compressed calls */
  uint64_t bytes_device_ipc_read;  /* device collectives: read from host-mates' GPUs over CUDA IPC */
  uint64_t bytes_device_to_host;   /* device collectives: copied to pinned host memory */
  uint64_t bytes_host_to_device;   /* device collectives: copied from pinned host memory */
} hetcclMetrics_t;
/* Waits for a collective running on another thread, if any, to end. */
hetcclResult_t hetcclCommGetMetrics(hetcclComm_t comm, hetcclMetrics_t* metrics);
/* How long calls issued on comm from now on wait for a peer before they fail naming it
 * (HETCCL_TIMEOUT until then), in seconds from 0.001 to 604800 (one week); calls already
 * running keep theirs. */
hetcclResult_t hetcclCommSetTimeout(hetcclComm_t comm, double seconds);
/* Always hetcclSuccess for a live comm: errors are returned by the calls themselves. */
hetcclResult_t hetcclCommGetAsyncError(hetcclComm_t comm, hetcclResult_t* asyncError);

/* Static description of a code. */
const char* hetcclGetErrorString(hetcclResult_t result);
/* Message of the last failed call on this thread ("" if none); comm may be NULL. Valid
 * until the next failing call on this thread. */
const char* hetcclGetLastError(hetcclComm_t comm);

/* In place when sendbuff == recvbuff. In every collective, send and receive buffers that
 * overlap other than in the documented in-place layout are refused (hetcclInvalidArgument). */
hetcclResult_t hetcclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                               hetcclDataType_t datatype, hetcclRedOp_t op, hetcclComm_t comm,
                               hetcclStream_t stream);

/* sendbuff holds nranks * recvcount elements; rank r receives reduced block r. In place
 * when recvbuff == sendbuff + r * recvcount elements (the other blocks are only read). */
hetcclResult_t hetcclReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                                   hetcclDataType_t datatype, hetcclRedOp_t op,
                                   hetcclComm_t comm, hetcclStream_t stream);

/* recvbuff holds nranks * sendcount elements, rank r's contribution at block r. In place
 * when sendbuff == recvbuff + r * sendcount elements. */
hetcclResult_t hetcclAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                               hetcclDataType_t datatype, hetcclComm_t comm,
                               hetcclStream_t stream);

/* Root copies sendbuff to recvbuff when they differ; sendbuff may be NULL elsewhere. */
hetcclResult_t hetcclBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                               hetcclDataType_t datatype, int root, hetcclComm_t comm,
                               hetcclStream_t stream);

/* Only root's recvbuff is written; recvbuff may be NULL elsewhere. In place when
 * sendbuff == recvbuff on the root. */
hetcclResult_t hetcclReduce(const void* sendbuff, void* recvbuff, size_t count,
                            hetcclDataType_t datatype, hetcclRedOp_t op, int root,
                            hetcclComm_t comm, hetcclStream_t stream);

/* Point to point: the peer posts the matching call with the same count and datatype.
 * Put exchanges between hetcclGroupStart/End: there they cannot deadlock. */
hetcclResult_t hetcclSend(const void* sendbuff, size_t count, hetcclDataType_t datatype,
                          int peer, hetcclComm_t comm, hetcclStream_t stream);
hetcclResult_t hetcclRecv(void* recvbuff, size_t count, hetcclDataType_t datatype, int peer,
                          hetcclComm_t comm, hetcclStream_t stream);

/* Calls between these are checked at once and run at the outermost hetcclGroupEnd
 * (collectives in call order, then sends/receives in a deadlock-free order). Buffers
 * must stay valid until then. If a call in the group failed, nothing runs and
 * hetcclGroupEnd returns that error. Group state is per thread. */
hetcclResult_t hetcclGroupStart(void);
hetcclResult_t hetcclGroupEnd(void);

/* Device collectives (libhetccl built with the cuda feature; otherwise every call below
 * returns hetcclUnhandledCudaError saying so). A device communicator is made on a host
 * communicator for one CUDA device of this process (its primary context, the CUDA
 * runtime's); every rank makes one and then makes the same device calls in the same
 * order, which run their agreement through the host communicator. Buffers are device
 * memory of that GPU; each call starts after the work queued on `stream` before it, work
 * queued there afterwards waits for it, and it returns once the result is in recvbuff.
 * A buffer smaller than the count is refused on every rank (this one naming the
 * buffer's allocation and size, the others this rank). Reductions
 * take float32, float16 and bfloat16 (computed in f32); broadcast and all-gather take
 * every datatype. Device calls cannot be part of a group. Destroy a device communicator
 * before its host communicator. */
typedef struct hetcclDeviceComm* hetcclDeviceComm_t;

hetcclResult_t hetcclDeviceCommInit(hetcclDeviceComm_t* dcomm, hetcclComm_t comm, int device);
hetcclResult_t hetcclDeviceCommDestroy(hetcclDeviceComm_t dcomm);

/* Layouts as the host calls'. In place where sendbuff == recvbuff (all-reduce, broadcast,
 * reduce); otherwise the two buffers must not overlap (all-gather and reduce-scatter have
 * no in-place layout here). */
hetcclResult_t hetcclDeviceAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                                     hetcclDataType_t datatype, hetcclRedOp_t op,
                                     hetcclDeviceComm_t dcomm, hetcclStream_t stream);
hetcclResult_t hetcclDeviceBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                                     hetcclDataType_t datatype, int root,
                                     hetcclDeviceComm_t dcomm, hetcclStream_t stream);
hetcclResult_t hetcclDeviceReduce(const void* sendbuff, void* recvbuff, size_t count,
                                  hetcclDataType_t datatype, hetcclRedOp_t op, int root,
                                  hetcclDeviceComm_t dcomm, hetcclStream_t stream);
hetcclResult_t hetcclDeviceAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                                     hetcclDataType_t datatype, hetcclDeviceComm_t dcomm,
                                     hetcclStream_t stream);
hetcclResult_t hetcclDeviceReduceScatter(const void* sendbuff, void* recvbuff,
                                         size_t recvcount, hetcclDataType_t datatype,
                                         hetcclRedOp_t op, hetcclDeviceComm_t dcomm,
                                         hetcclStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* HETCCL_H_ */
