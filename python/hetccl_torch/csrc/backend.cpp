// hetccl as a c10d Backend: CPU and CUDA tensors through bindings/hetccl.h.
//
// The C API is synchronous, so every collective runs on one thread of this backend, in
// the order the program issued them (the order every rank issues them in, which the
// collectives need); the Work returned at once completes when that thread has run the
// call. A failed call's message is hetccl's own (hetcclGetLastError, read on the thread
// that made the call), raised as torch.distributed.DistBackendError.
//
// CUDA tensors go through hetccl's device calls (hetcclDevice*, in a libhetccl built
// with the cuda feature; elsewhere they fail saying so), ordered as NCCL's are: at issue
// a stream of this backend's waits for the work queued so far on the tensor's current
// stream, the backend thread hands that stream to the device call, which starts after
// it, and the Work completes once the result is in the tensor (the device calls return
// then). No CUDA header is needed: streams and events go through c10's device-generic
// interface. Point to point and all_to_all move CUDA tensors through host copies.
//
// Point to point (send, recv, isend, irecv, batch_isend_irecv) does not run there: as
// with Gloo, each one progresses on its own, whatever the order the two sides post them
// in and whatever collectives run meanwhile. Every ordered pair of ranks (p -> q) has a
// channel: a two-rank hetccl communicator of its own (p is its rank 0, q its rank 1)
// with one thread on each side, made when the backend is (every rank makes a unique id
// per channel it sends on and hands it out over the group's communicator, so the job
// key never leaves hetccl's links). A channel carries p's sends in the order
// p posted them; each message is a header (tag, dtype, count: 3 x int64) and then the
// payload. q's thread reads a header only while a receive from p is posted, delivers
// the payload into the oldest posted receive of that tag, and keeps a message nobody
// has posted a receive for yet (another tag's, or one ahead of its receive) in a buffer
// of its own until that receive is posted, so sends and receives match by (peer, tag)
// and, per tag, in post order.
//
// Coalescing (batch_isend_irecv, _coalescing_manager): between startCoalescing and
// endCoalescing the calls are only recorded; endCoalescing posts the sends and receives
// on their channels and queues the collectives as one item that the backend thread runs
// between hetcclGroupStart and hetcclGroupEnd; the batch's Work completes when all of it
// has. all_to_all is a collective: per peer, a send of its block and a receive of the
// peer's in one hetccl group on the group's communicator.
#include <torch/extension.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "hetccl.h"

namespace hetccl_torch {

[[noreturn]] void fail(const std::string& what) {
  C10_THROW_ERROR(DistBackendError, what);
}

void check(hetcclResult_t r, hetcclComm_t comm, const char* call) {
  if (r != hetcclSuccess) {
    const char* msg = hetcclGetLastError(comm);
    fail(std::string("hetccl: ") + call + " failed (" + hetcclGetErrorString(r) + "): " +
         (msg && *msg ? msg : "no message"));
  }
}

hetcclDataType_t dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kChar: return hetcclInt8;
    case at::kByte: return hetcclUint8;
    case at::kInt: return hetcclInt32;
    case at::kUInt32: return hetcclUint32;
    case at::kLong: return hetcclInt64;
    case at::kUInt64: return hetcclUint64;
    case at::kHalf: return hetcclFloat16;
    case at::kFloat: return hetcclFloat32;
    case at::kDouble: return hetcclFloat64;
    case at::kBFloat16: return hetcclBfloat16;
    default:
      fail(std::string("hetccl backend: dtype ") + c10::toString(t.scalar_type()) +
           " is not supported; it accepts int8, uint8, int32, uint32, int64, uint64, "
           "float16, bfloat16, float32, float64");
  }
}

hetcclRedOp_t op_of(const c10d::ReduceOp& op) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return hetcclSum;
    case c10d::ReduceOp::AVG: return hetcclAvg;
    case c10d::ReduceOp::PRODUCT: return hetcclProd;
    case c10d::ReduceOp::MIN: return hetcclMin;
    case c10d::ReduceOp::MAX: return hetcclMax;
    default:
      fail("hetccl backend: reduce op " + std::to_string(static_cast<int>(op.op_)) +
           " is not supported; it accepts SUM, AVG, PRODUCT, MIN, MAX");
  }
}

// One dense, contiguous CPU tensor: what the C API can address as one buffer.
const at::Tensor& one_cpu(const std::vector<at::Tensor>& ts, const char* op) {
  if (ts.size() != 1) {
    fail(std::string("hetccl backend: ") + op + " takes one tensor per call, got " +
         std::to_string(ts.size()));
  }
  return ts[0];
}

void check_dense(const at::Tensor& t, const char* op) {
  if (t.is_sparse() || !t.is_contiguous()) {
    fail(std::string("hetccl backend: ") + op + " needs a dense contiguous tensor");
  }
  (void)dtype_of(t);
}

// CPU or CUDA tensors.
void check_tensor(const at::Tensor& t, const char* op) {
  if (!t.device().is_cpu() && !t.is_cuda()) {
    fail(std::string("hetccl backend: ") + op + " got a tensor on " + t.device().str() +
         "; this backend moves CPU and CUDA tensors");
  }
  check_dense(t, op);
}

// An input and an output of one call must be on one device.
void check_same_device(const at::Tensor& in, const at::Tensor& out, const char* op) {
  if (in.device() != out.device()) {
    fail(std::string("hetccl backend: ") + op + "'s input is on " + in.device().str() +
         " and its output on " + out.device().str() + "; they must be on one device");
  }
}

// The CUDA devices of a call's outputs: its Future's devices, so that callbacks chained
// on it (DDP's comm hooks) and its waiters are ordered after it on their streams.
std::vector<c10::Device> cuda_devices(const std::vector<at::Tensor>& ts) {
  std::vector<c10::Device> ds;
  for (const auto& t : ts) {
    if (t.is_cuda() && std::find(ds.begin(), ds.end(), t.device()) == ds.end()) {
      ds.push_back(t.device());
    }
  }
  return ds;
}

class WorkHetccl : public c10d::Work {
 public:
  WorkHetccl(int rank, c10d::OpType type, std::vector<at::Tensor> outputs)
      : c10d::Work(rank, type),
        outputs_(std::move(outputs)),
        future_(c10::make_intrusive<c10::ivalue::Future>(
            c10::ListType::create(c10::TensorType::get()), cuda_devices(outputs_))) {}

  bool isCompleted() override {
    std::lock_guard<std::mutex> g(m_);
    return done_;
  }
  bool isSuccess() const override {
    std::lock_guard<std::mutex> g(m_);
    return done_ && !error_;
  }
  std::exception_ptr exception() const override {
    std::lock_guard<std::mutex> g(m_);
    return error_;
  }
  std::vector<at::Tensor> result() override { return outputs_; }
  const std::vector<at::Tensor>& outputs() const { return outputs_; }

  bool wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> g(m_);
    if (timeout == kNoTimeout) {
      cv_.wait(g, [&] { return done_; });
    } else if (!cv_.wait_for(g, timeout, [&] { return done_; })) {
      fail("hetccl backend: wait() timed out after " + std::to_string(timeout.count()) +
           " ms; the call is still running (hetccl's own limit is HETCCL_TIMEOUT)");
    }
    if (error_) std::rethrow_exception(error_);
    return true;
  }

  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

  // On the backend thread, once the call has returned.
  void finish(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> g(m_);
      done_ = true;
      error_ = e;
    }
    cv_.notify_all();
    if (e) {
      future_->setError(e);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
  }

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  mutable std::mutex m_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

// What a finished call reports to: its Work, and a batch's Work where it is part of one.
using Done = std::function<void(std::exception_ptr)>;

// Completes `work` once `count` parts have arrived, with the first error among them.
class Joint {
 public:
  Joint(c10::intrusive_ptr<WorkHetccl> work, size_t count)
      : work_(std::move(work)), left_(count) {
    if (left_ == 0) work_->finish(nullptr);
  }
  void arrive(std::exception_ptr e) {
    bool last;
    {
      std::lock_guard<std::mutex> g(m_);
      if (e && !error_) error_ = e;
      last = --left_ == 0;
    }
    if (last) work_->finish(error_);
  }

 private:
  c10::intrusive_ptr<WorkHetccl> work_;
  std::mutex m_;
  size_t left_;
  std::exception_ptr error_;
};

at::ScalarType scalar_of(int64_t dt) {
  switch (dt) {
    case hetcclInt8: return at::kChar;
    case hetcclUint8: return at::kByte;
    case hetcclInt32: return at::kInt;
    case hetcclUint32: return at::kUInt32;
    case hetcclInt64: return at::kLong;
    case hetcclUint64: return at::kUInt64;
    case hetcclFloat16: return at::kHalf;
    case hetcclFloat32: return at::kFloat;
    case hetcclFloat64: return at::kDouble;
    case hetcclBfloat16: return at::kBFloat16;
    default: fail("hetccl backend: a message header names dtype " + std::to_string(dt));
  }
}

// One direction of point-to-point traffic with one peer (see the top of this file).
// This rank's rank in the channel's communicator: 0 where it sends, 1 where it receives.
class Channel {
 public:
  struct Op {
    int tag;
    at::Tensor t;
    Done done;
    double timeout = 0;  // seconds, 0: as the channel was made (see set_timeout)
  };

  Channel(hetcclComm_t comm, bool sends, int rank, int peer)
      : comm_(comm), sends_(sends), rank_(rank), peer_(peer) {
    thread_ = std::thread([this] { sends_ ? run_sends() : run_recvs(); });
  }

  // Sends still queued are sent first; a call blocked on a peer that never comes (a
  // receive whose send was never posted) is cut short by aborting the communicator.
  ~Channel() {
    bool abort;
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
      abort = busy_ && !sends_;
    }
    cv_.notify_all();
    if (abort) aborted_ = hetcclCommAbort(comm_) == hetcclSuccess;
    if (thread_.joinable()) thread_.join();
    if (!aborted_) (broken_ ? hetcclCommAbort(comm_) : hetcclCommDestroy(comm_));
  }

  void post(Op op) {
    std::exception_ptr broken;
    {
      std::lock_guard<std::mutex> g(m_);
      broken = broken_;
      if (!broken) {
        if (sends_) {
          sends_q_.push_back(std::move(op));
        } else {
          if (op.timeout > 0) recv_timeout_ = op.timeout;
          posted_[op.tag].push_back(std::move(op));
          ++n_posted_;
        }
      }
    }
    if (broken) {
      op.done(broken);
      return;
    }
    cv_.notify_all();
  }

 private:
  struct Header {
    int64_t tag, dtype, count;
  };

  // The timeout the next call waits for the peer: a send's own, set when it was
  // posted; for receives (a header may belong to any of them) the latest posted one's.
  void apply_timeout(double seconds, int tag) {
    if (seconds <= 0 || seconds == applied_timeout_) return;
    call(hetcclCommSetTimeout(comm_, seconds), tag);
    applied_timeout_ = seconds;
  }

  // hetccl's message speaks of the channel's two ranks; say which ranks of the group
  // they are.
  // tag < 0: a header, whose tag is not known yet.
  void call(hetcclResult_t r, int tag) {
    if (r == hetcclSuccess) return;
    const char* msg = hetcclGetLastError(comm_);
    fail("hetccl backend: rank " + std::to_string(rank_) + (sends_ ? "'s send to rank " :
         "'s recv from rank ") + std::to_string(peer_) +
         (tag < 0 ? std::string() : " with tag " + std::to_string(tag)) + " failed (" +
         hetcclGetErrorString(r) + "); on their channel rank " +
         std::to_string(sends_ ? rank_ : peer_) + " is rank 0 and rank " +
         std::to_string(sends_ ? peer_ : rank_) + " rank 1: " +
         (msg && *msg ? msg : "no message"));
  }

  // The channel is unusable after a failed call: what is posted, and all posted later,
  // fail with its error.
  void break_with(std::exception_ptr e) {
    std::vector<Op> failed;
    {
      std::lock_guard<std::mutex> g(m_);
      if (!broken_) broken_ = e;
      for (auto& o : sends_q_) failed.push_back(std::move(o));
      sends_q_.clear();
      for (auto& [tag, q] : posted_) {
        for (auto& o : q) failed.push_back(std::move(o));
      }
      posted_.clear();
      n_posted_ = 0;
    }
    for (auto& o : failed) o.done(broken_);
  }

  void run_sends() {
    for (;;) {
      Op op;
      {
        std::unique_lock<std::mutex> g(m_);
        cv_.wait(g, [&] { return stop_ || !sends_q_.empty(); });
        if (sends_q_.empty()) return;
        op = std::move(sends_q_.front());
        sends_q_.pop_front();
        busy_ = true;
      }
      std::exception_ptr e;
      try {
        apply_timeout(op.timeout, op.tag);
        Header h{op.tag, dtype_of(op.t), op.t.numel()};
        call(hetcclSend(&h, 3, hetcclInt64, 1, comm_, nullptr), op.tag);
        if (h.count > 0) {
          call(hetcclSend(op.t.data_ptr(), h.count, static_cast<hetcclDataType_t>(h.dtype), 1,
                          comm_, nullptr),
               op.tag);
        }
      } catch (...) {
        e = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> g(m_);
        busy_ = false;
      }
      op.done(e);
      if (e) break_with(e);
    }
  }

  // Checks that the message `got` (from the buffer of early messages) fits `op`, and
  // copies it in.
  void deliver(Op& op, const at::Tensor& got) {
    std::exception_ptr e;
    try {
      check_fits(op, got.scalar_type(), got.numel());
      if (got.numel() > 0) op.t.view({-1}).copy_(got);
    } catch (...) {
      e = std::current_exception();
    }
    op.done(e);
  }

  void check_fits(const Op& op, at::ScalarType dt, int64_t count) const {
    if (op.t.scalar_type() != dt || op.t.numel() != count) {
      fail("hetccl backend: rank " + std::to_string(rank_) + "'s recv from rank " +
           std::to_string(peer_) + " with tag " + std::to_string(op.tag) +
           " was posted for " + std::to_string(op.t.numel()) + " elements of " +
           c10::toString(op.t.scalar_type()) + "; rank " + std::to_string(peer_) + " sent " +
           std::to_string(count) + " elements of " + c10::toString(dt));
    }
  }

  void run_recvs() {
    for (;;) {
      std::optional<Op> early_op;
      at::Tensor early;
      double timeout;
      {
        std::unique_lock<std::mutex> g(m_);
        cv_.wait(g, [&] { return stop_ || n_posted_ > 0; });
        if (stop_) break;
        // A posted receive whose message came before it.
        for (auto& [tag, q] : posted_) {
          auto it = early_.find(tag);
          if (q.empty() || it == early_.end() || it->second.empty()) continue;
          early_op = std::move(q.front());
          q.pop_front();
          --n_posted_;
          early = std::move(it->second.front());
          it->second.pop_front();
          break;
        }
        if (!early_op) busy_ = true;
        timeout = recv_timeout_;
      }
      if (early_op) {
        deliver(*early_op, early);
        continue;
      }
      // The next message on the channel, for whichever tag.
      std::exception_ptr e;
      try {
        apply_timeout(timeout, -1);
        Header h{};
        call(hetcclRecv(&h, 3, hetcclInt64, 0, comm_, nullptr), -1);
        at::ScalarType dt = scalar_of(h.dtype);
        std::optional<Op> op;
        {
          std::lock_guard<std::mutex> g(m_);
          auto it = posted_.find(static_cast<int>(h.tag));
          if (it != posted_.end() && !it->second.empty()) {
            op = std::move(it->second.front());
            it->second.pop_front();
            --n_posted_;
          }
        }
        bool direct = op && op->t.scalar_type() == dt && op->t.numel() == h.count;
        at::Tensor into = direct ? op->t : at::empty({h.count}, at::TensorOptions().dtype(dt));
        if (h.count > 0) {
          call(hetcclRecv(into.data_ptr(), h.count, static_cast<hetcclDataType_t>(h.dtype), 0,
                          comm_, nullptr),
               static_cast<int>(h.tag));
        }
        if (direct) {
          op->done(nullptr);
        } else if (op) {
          deliver(*op, into);  // does not fit: its error
        } else {
          std::lock_guard<std::mutex> g(m_);
          early_[static_cast<int>(h.tag)].push_back(into);
        }
      } catch (...) {
        e = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> g(m_);
        busy_ = false;
      }
      if (e) break_with(e);
    }
    // Stopped: receives still posted never get their message.
    try {
      fail("hetccl backend: the process group was destroyed while a recv from rank " +
           std::to_string(peer_) + " was posted");
    } catch (...) {
      break_with(std::current_exception());
    }
  }

  hetcclComm_t comm_;
  const bool sends_;
  const int rank_, peer_;
  std::thread thread_;
  std::mutex m_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool busy_ = false;  // inside a hetccl call
  bool aborted_ = false;
  double recv_timeout_ = 0;     // under m_
  double applied_timeout_ = 0;  // the channel thread's
  std::exception_ptr broken_;
  std::deque<Op> sends_q_;                    // sending side, in post order
  std::map<int, std::deque<Op>> posted_;      // receiving side: per tag, in post order
  size_t n_posted_ = 0;
  std::map<int, std::deque<at::Tensor>> early_;  // messages ahead of their receive
};

class BackendHetccl : public c10d::Backend {
 public:
  // p2p_host: where this rank's channel stores listen (an address the group's other
  // ranks reach); key_from_env: the channels' ids carry no key, every rank has
  // HETCCL_JOB_KEY.
  BackendHetccl(int rank, int size, const std::string& id, const std::string& settings,
                const std::string& p2p_host, bool key_from_env)
      : c10d::Backend(rank, size) {
    if (id.size() != sizeof(hetcclUniqueId)) {
      fail("hetccl backend: the unique id has " + std::to_string(id.size()) +
           " bytes, not " + std::to_string(sizeof(hetcclUniqueId)));
    }
    hetcclUniqueId uid;
    std::memcpy(uid.internal, id.data(), sizeof(uid.internal));
    {
      // Bootstrap blocks until every rank joins; let other Python threads run meanwhile.
      pybind11::gil_scoped_release nogil;
      hetcclResult_t r = hetcclCommInitRankSettings(
          &comm_, size, uid, rank, settings.empty() ? nullptr : settings.c_str());
      check(r, nullptr, "hetcclCommInitRankSettings");
      open_channels(settings, p2p_host, key_from_env);
    }
    thread_ = std::thread([this] { run(); });
  }

  // Dropped from Python (destroy_process_group), the GIL held: the backend's threads
  // may need it to finish (dropping the last reference to a tensor Python made takes
  // the GIL), so it is released while they are joined.
  ~BackendHetccl() override {
    if (PyGILState_Check()) {
      pybind11::gil_scoped_release nogil;
      shutdown();
    } else {
      shutdown();
    }
  }

  void shutdown() {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    to_.clear();
    from_.clear();
    for (auto& [index, d] : dcomms_) {
      if (d) (void)hetcclDeviceCommDestroy(d);
    }
    dcomms_.clear();
    if (comm_) (failed_ ? hetcclCommAbort(comm_) : hetcclCommDestroy(comm_));
  }

  const std::string getBackendName() const override { return "hetccl"; }

  // torch.distributed.set_timeout: calls issued from now on wait that long for a peer
  // (hetccl's HETCCL_TIMEOUT range: shorter ones wait a millisecond, longer a week).
  // Each call carries the timeout of its issue; the thread that runs it hands it to
  // hetccl (hetcclCommSetTimeout) before the call where it changed.
  void setTimeout(std::chrono::milliseconds timeout) override {
    double s = std::clamp(static_cast<double>(timeout.count()) / 1000.0, 0.001, 604800.0);
    timeout_s_.store(s);
  }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& ts,
                                          const c10d::AllreduceOptions& o) override {
    at::Tensor t = one_cpu(ts, "all_reduce");
    check_tensor(t, "all_reduce");
    auto dt = dtype_of(t);
    auto op = op_of(o.reduceOp);
    Place where = place_of(t);
    return enqueue(c10d::OpType::ALLREDUCE, {t}, [=, this] {
      void* p = t.data_ptr();
      if (where.device) {
        check(hetcclDeviceAllReduce(p, p, t.numel(), dt, op, dcomm(where), where.stream), comm_,
              "hetcclDeviceAllReduce");
      } else {
        check(hetcclAllReduce(p, p, t.numel(), dt, op, comm_, nullptr), comm_,
              "hetcclAllReduce");
      }
    }, nullptr, where.device);
  }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& ts,
                                          const c10d::BroadcastOptions& o) override {
    at::Tensor t = one_cpu(ts, "broadcast");
    check_tensor(t, "broadcast");
    auto dt = dtype_of(t);
    int root = static_cast<int>(o.rootRank);
    Place where = place_of(t);
    return enqueue(c10d::OpType::BROADCAST, {t}, [=, this] {
      void* p = t.data_ptr();
      if (where.device) {
        check(hetcclDeviceBroadcast(p, p, t.numel(), dt, root, dcomm(where), where.stream), comm_,
              "hetcclDeviceBroadcast");
      } else {
        check(hetcclBroadcast(p, p, t.numel(), dt, root, comm_, nullptr), comm_,
              "hetcclBroadcast");
      }
    }, nullptr, where.device);
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& ts,
                                       const c10d::ReduceOptions& o) override {
    at::Tensor t = one_cpu(ts, "reduce");
    check_tensor(t, "reduce");
    auto dt = dtype_of(t);
    auto op = op_of(o.reduceOp);
    int root = static_cast<int>(o.rootRank);
    bool is_root = root == rank_;
    Place where = place_of(t);
    return enqueue(c10d::OpType::REDUCE, {t}, [=, this] {
      void* p = t.data_ptr();
      void* r = is_root ? p : nullptr;
      if (where.device) {
        check(hetcclDeviceReduce(p, r, t.numel(), dt, op, root, dcomm(where), where.stream), comm_,
              "hetcclDeviceReduce");
      } else {
        check(hetcclReduce(p, r, t.numel(), dt, op, root, comm_, nullptr), comm_,
              "hetcclReduce");
      }
    }, nullptr, where.device);
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outs,
                                          std::vector<at::Tensor>& ins,
                                          const c10d::AllgatherOptions&) override {
    at::Tensor in = one_cpu(ins, "all_gather");
    check_tensor(in, "all_gather");
    if (outs.size() != 1 || static_cast<int>(outs[0].size()) != size_) {
      fail("hetccl backend: all_gather needs one list of " + std::to_string(size_) +
           " output tensors");
    }
    std::vector<at::Tensor> out = outs[0];
    for (size_t r = 0; r < out.size(); ++r) {
      if (out[r].numel() != in.numel() || out[r].scalar_type() != in.scalar_type()) {
        fail("hetccl backend: all_gather output " + std::to_string(r) + " has " +
             std::to_string(out[r].numel()) + " elements of " +
             c10::toString(out[r].scalar_type()) + "; the input has " +
             std::to_string(in.numel()) + " of " + c10::toString(in.scalar_type()));
      }
      check_same_device(in, out[r], "all_gather");
    }
    auto dt = dtype_of(in);
    int n = size_;
    Place where = place_of(in);
    // Gathered into one buffer, copied out once the call (or its group) has run: on a GPU
    // on the backend's stream, waited for before the Work completes.
    at::Tensor flat = at::empty({n * in.numel()}, in.options());
    return enqueue(
        c10d::OpType::ALLGATHER, out,
        [=, this] {
          if (where.device) {
            check(hetcclDeviceAllGather(in.data_ptr(), flat.data_ptr(), in.numel(), dt,
                                        dcomm(where), where.stream),
                  comm_, "hetcclDeviceAllGather");
          } else {
            check(hetcclAllGather(in.data_ptr(), flat.data_ptr(), in.numel(), dt, comm_,
                                  nullptr),
                  comm_, "hetcclAllGather");
          }
        },
        [=, this] {
          on_side(where, [&] {
            for (int r = 0; r < n; ++r) {
              out[r].view({-1}).copy_(flat.narrow(0, r * in.numel(), in.numel()));
            }
          });
        },
        where.device);
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& out, at::Tensor& in,
                                                const c10d::AllgatherOptions&) override {
    check_tensor(in, "all_gather_into_tensor");
    check_tensor(out, "all_gather_into_tensor");
    check_same_device(in, out, "all_gather_into_tensor");
    if (out.numel() != in.numel() * size_ || out.scalar_type() != in.scalar_type()) {
      fail("hetccl backend: all_gather_into_tensor's output has " +
           std::to_string(out.numel()) + " elements; it must have world size (" +
           std::to_string(size_) + ") times the input's " + std::to_string(in.numel()) +
           ", of the same dtype");
    }
    auto dt = dtype_of(in);
    Place where = place_of(in);
    return enqueue(c10d::OpType::_ALLGATHER_BASE, {out}, [=, this] {
      if (where.device) {
        check(hetcclDeviceAllGather(in.data_ptr(), out.data_ptr(), in.numel(), dt, dcomm(where),
                                    where.stream),
              comm_, "hetcclDeviceAllGather");
      } else {
        check(hetcclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), dt, comm_, nullptr),
              comm_, "hetcclAllGather");
      }
    }, nullptr, where.device);
  }

  c10::intrusive_ptr<c10d::Work> all_gather_single(at::Tensor& out, at::Tensor& in,
                                                  const c10d::AllgatherOptions& o) override {
    return _allgather_base(out, in, o);
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& out, at::Tensor& in, const c10d::ReduceScatterOptions& o) override {
    check_tensor(in, "reduce_scatter_tensor");
    check_tensor(out, "reduce_scatter_tensor");
    check_same_device(in, out, "reduce_scatter_tensor");
    if (in.numel() != out.numel() * size_ || out.scalar_type() != in.scalar_type()) {
      fail("hetccl backend: reduce_scatter_tensor's input has " +
           std::to_string(in.numel()) + " elements; it must have world size (" +
           std::to_string(size_) + ") times the output's " + std::to_string(out.numel()) +
           ", of the same dtype");
    }
    auto dt = dtype_of(in);
    auto op = op_of(o.reduceOp);
    Place where = place_of(in);
    return enqueue(c10d::OpType::_REDUCE_SCATTER_BASE, {out}, [=, this] {
      if (where.device) {
        check(hetcclDeviceReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), dt, op,
                                        dcomm(where), where.stream),
              comm_, "hetcclDeviceReduceScatter");
      } else {
        check(hetcclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), dt, op, comm_,
                                  nullptr),
              comm_, "hetcclReduceScatter");
      }
    }, nullptr, where.device);
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_single(
      at::Tensor& out, at::Tensor& in, const c10d::ReduceScatterOptions& o) override {
    return _reduce_scatter_base(out, in, o);
  }

  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions&) override {
    // A one-element all-reduce: no rank leaves before every rank has entered, and it
    // runs after every call issued before it on this thread.
    at::Tensor t = at::zeros({1}, at::kInt);
    return enqueue(c10d::OpType::BARRIER, {}, [=, this] {
      check(hetcclAllReduce(t.data_ptr(), t.data_ptr(), 1, hetcclInt32, hetcclSum, comm_,
                            nullptr),
            comm_, "hetcclAllReduce (barrier)");
    });
  }

  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& ts, int dst, int tag) override {
    at::Tensor t = one_cpu(ts, "send");
    check_tensor(t, "send");
    check_peer(dst, "send");
    return post(c10d::OpType::SEND, t, dst, tag);
  }

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& ts, int src, int tag) override {
    at::Tensor t = one_cpu(ts, "recv");
    check_tensor(t, "recv");
    check_peer(src, "recv");
    return post(c10d::OpType::RECV, t, src, tag);
  }

  // all_to_all_single: rank r's input rows [in_off[p], in_off[p] + in_rows[p]) go to
  // rank p, which receives them at its rows [out_off[r], ...). Equal blocks of
  // size(0) / world size rows when the split sizes are empty.
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& out, at::Tensor& in,
                                              std::vector<int64_t>& out_splits,
                                              std::vector<int64_t>& in_splits,
                                              const c10d::AllToAllOptions&) override {
    check_tensor(in, "all_to_all_single");
    check_tensor(out, "all_to_all_single");
    check_same_device(in, out, "all_to_all_single");
    if (in.scalar_type() != out.scalar_type()) {
      fail(std::string("hetccl backend: all_to_all_single's input is ") +
           c10::toString(in.scalar_type()) + " and its output " +
           c10::toString(out.scalar_type()) + "; they must be of one dtype");
    }
    auto in_rows = rows_of(in, in_splits, "input");
    auto out_rows = rows_of(out, out_splits, "output");
    int64_t in_row = in.dim() == 0 || in.size(0) == 0 ? 0 : in.numel() / in.size(0);
    int64_t out_row = out.dim() == 0 || out.size(0) == 0 ? 0 : out.numel() / out.size(0);
    if (in.dim() > 0 && out.dim() > 0 && in.size(0) > 0 && out.size(0) > 0 &&
        in_row != out_row) {
      fail("hetccl backend: all_to_all_single's input rows have " + std::to_string(in_row) +
           " elements and its output rows " + std::to_string(out_row) +
           "; rows (everything but dimension 0) must be of one shape");
    }
    int64_t row = std::max(in_row, out_row);
    auto dt = dtype_of(in);
    // On a GPU through host copies (stage_in, stage_out, copy_back).
    at::Tensor in_w = stage_in(in), out_w = stage_out(out);
    Place where = place_of(out);
    std::vector<Call> calls;
    int64_t in_off = 0, out_off = 0;
    for (int p = 0; p < size_; ++p) {
      int64_t src = in_off * row, dst = out_off * row;
      size_t n_send = in_rows[p] * row, n_recv = out_rows[p] * row;
      // The captured tensors keep both buffers alive until the group has run.
      calls.push_back({[=, this] {
                         char* s = static_cast<char*>(in_w.data_ptr()) + src * in.element_size();
                         char* d = static_cast<char*>(out_w.data_ptr()) + dst * out.element_size();
                         check(hetcclSend(s, n_send, dt, p, comm_, nullptr), comm_,
                               "hetcclSend (all_to_all_single)");
                         check(hetcclRecv(d, n_recv, dt, p, comm_, nullptr), comm_,
                               "hetcclRecv (all_to_all_single)");
                       },
                       nullptr});
      in_off += in_rows[p];
      out_off += out_rows[p];
    }
    if (where.device) {
      calls.back().after = [=, this] { copy_back(out, out_w, where); };
    }
    return enqueue_group(c10d::OpType::ALLTOALL_BASE, {out}, std::move(calls));
  }

  c10::intrusive_ptr<c10d::Work> all_to_all_single(at::Tensor& out, at::Tensor& in,
                                                  std::vector<int64_t>& out_splits,
                                                  std::vector<int64_t>& in_splits,
                                                  const c10d::AllToAllOptions& o) override {
    return alltoall_base(out, in, out_splits, in_splits, o);
  }

  // all_to_all: ins[p] goes to rank p, outs[p] comes from rank p.
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outs,
                                         std::vector<at::Tensor>& ins,
                                         const c10d::AllToAllOptions&) override {
    if (static_cast<int>(outs.size()) != size_ || static_cast<int>(ins.size()) != size_) {
      fail("hetccl backend: all_to_all takes one input and one output tensor per rank (" +
           std::to_string(size_) + "), got " + std::to_string(ins.size()) + " inputs and " +
           std::to_string(outs.size()) + " outputs");
    }
    std::vector<Call> calls;
    for (int p = 0; p < size_; ++p) {
      at::Tensor i = ins[p], o = outs[p];
      check_tensor(i, "all_to_all");
      check_tensor(o, "all_to_all");
      check_same_device(i, o, "all_to_all");
      if (i.scalar_type() != o.scalar_type()) {
        fail("hetccl backend: all_to_all's input " + std::to_string(p) + " is " +
             c10::toString(i.scalar_type()) + " and its output " + std::to_string(p) + " " +
             c10::toString(o.scalar_type()) + "; they must be of one dtype");
      }
      auto dt = dtype_of(i);
      // On a GPU through host copies (stage_in, stage_out, copy_back).
      at::Tensor i_w = stage_in(i), o_w = stage_out(o);
      Place where = place_of(o);
      calls.push_back({[=, this] {
                         check(hetcclSend(i_w.data_ptr(), i.numel(), dt, p, comm_, nullptr),
                               comm_, "hetcclSend (all_to_all)");
                         check(hetcclRecv(o_w.data_ptr(), o.numel(), dt, p, comm_, nullptr),
                               comm_, "hetcclRecv (all_to_all)");
                       },
                       where.device ? std::function<void()>([=, this] { copy_back(o, o_w, where); })
                                    : nullptr});
    }
    return enqueue_group(c10d::OpType::ALLTOALL, outs, std::move(calls));
  }

  // The coalesced collectives (all_reduce_coalesced, _coalescing_manager's fast path):
  // one group of the single-tensor calls, which hetccl runs in call order.
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& ts, const c10d::AllreduceCoalescedOptions& o) override {
    return coalesced([&] {
      c10::intrusive_ptr<c10d::Work> last;
      for (auto& t : ts) {
        std::vector<at::Tensor> one{t};
        c10d::AllreduceOptions each;
        each.reduceOp = o.reduceOp;
        last = allreduce(one, each);
      }
      return last;
    });
  }

  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outs, std::vector<at::Tensor>& ins,
      const c10d::AllgatherOptions& o) override {
    check_pairs(outs, ins, "all_gather_into_tensor (coalesced)");
    return coalesced([&] {
      c10::intrusive_ptr<c10d::Work> last;
      for (size_t k = 0; k < ins.size(); ++k) last = _allgather_base(outs[k], ins[k], o);
      return last;
    });
  }

  c10::intrusive_ptr<c10d::Work> all_gather_single_coalesced(
      std::vector<at::Tensor>& outs, std::vector<at::Tensor>& ins,
      const c10d::AllgatherOptions& o) override {
    return allgather_into_tensor_coalesced(outs, ins, o);
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outs, std::vector<at::Tensor>& ins,
      const c10d::ReduceScatterOptions& o) override {
    check_pairs(outs, ins, "reduce_scatter_tensor (coalesced)");
    return coalesced([&] {
      c10::intrusive_ptr<c10d::Work> last;
      for (size_t k = 0; k < ins.size(); ++k) last = _reduce_scatter_base(outs[k], ins[k], o);
      return last;
    });
  }

  c10::intrusive_ptr<c10d::Work> reduce_scatter_single_coalesced(
      std::vector<at::Tensor>& outs, std::vector<at::Tensor>& ins,
      const c10d::ReduceScatterOptions& o) override {
    return reduce_scatter_tensor_coalesced(outs, ins, o);
  }

  bool supportsCoalescing() const override { return true; }

  void startCoalescing() override {
    std::lock_guard<std::mutex> g(m_);
    if (coalescing_) {
      fail("hetccl backend: startCoalescing while a coalesced batch is open; end it first");
    }
    coalescing_ = true;
  }

  // The recorded calls as one group; the Work returned completes when all of them have.
  c10::intrusive_ptr<c10d::Work> endCoalescing() override {
    std::vector<std::pair<c10::intrusive_ptr<WorkHetccl>, Call>> batch;
    std::vector<std::pair<Channel*, Channel::Op>> p2p;
    {
      std::lock_guard<std::mutex> g(m_);
      if (!coalescing_) {
        fail("hetccl backend: endCoalescing without startCoalescing");
      }
      coalescing_ = false;
      batch.swap(batch_);
      p2p.swap(batch_p2p_);
    }
    std::vector<at::Tensor> outputs;
    Item item;
    // Device calls are not part of hetccl groups: a batch with one runs call by call, in
    // order (its collectives need no group; point to point moves CPU tensors apart).
    item.grouped = std::none_of(batch.begin(), batch.end(), [](const auto& wc) {
      return wc.second.device;
    });
    for (auto& [w, c] : batch) {
      if (w) {
        for (const auto& t : w->outputs()) outputs.push_back(t);
        item.dones.push_back([w](std::exception_ptr e) { w->finish(e); });
      }
      item.calls.push_back(std::move(c));
    }
    for (auto& [ch, op] : p2p) outputs.push_back(op.t);
    auto work = c10::make_intrusive<WorkHetccl>(rank_, c10d::OpType::COALESCED, outputs);
    // The batch's Work: when its collectives (one item) and each send and receive are done.
    auto joint = std::make_shared<Joint>(work, p2p.size() + (item.calls.empty() ? 0 : 1));
    for (auto& [ch, op] : p2p) {
      Done own = std::move(op.done);
      op.done = [own, joint](std::exception_ptr e) {
        own(e);
        joint->arrive(e);
      };
      ch->post(std::move(op));
    }
    if (!item.calls.empty()) {
      item.dones.push_back([joint](std::exception_ptr e) { joint->arrive(e); });
      push(std::move(item));
    }
    return work;
  }

 private:
  // One C API call (issue), and what must wait until it has run (after): inside a group
  // the call only returns at hetcclGroupEnd, so copies out of its buffers wait for that.
  struct Call {
    std::function<void()> issue;
    std::function<void()> after;
    bool device = false;  // a device call: never part of a hetccl group
  };

  // Where a tensor's call runs: on the host, or on CUDA device `index` after the work
  // queued on its current stream at issue (`stream`, the backend's stream there, which
  // the device call is handed).
  struct Place {
    bool device = false;
    int index = -1;
    void* stream = nullptr;
  };

  // For a CUDA tensor: the backend's stream on its device, made to wait for what is
  // queued on the device's current stream now.
  Place place_of(const at::Tensor& t) {
    if (!t.is_cuda()) return {};
    int index = t.device().index();
    c10::Stream side = side_stream(index);
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    c10::Stream current = impl->getStream(t.device());
    c10::Event issued(c10::DeviceType::CUDA);
    issued.record(current);
    issued.block(side);
    return {true, index, side.native_handle()};
  }

  // The backend's stream on CUDA device `index`, taken from c10's pool at first use.
  c10::Stream side_stream(int index) {
    std::lock_guard<std::mutex> g(side_m_);
    auto it = side_.find(index);
    if (it == side_.end()) {
      const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
      c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
      it = side_.emplace(index, impl->getStreamFromGlobalPool(d, false)).first;
    }
    return it->second;
  }

  // The device communicator for a call's device, made at its first call (backend thread
  // only; hetcclDeviceCommInit exchanges nothing, so each rank may make it when it first
  // needs it).
  hetcclDeviceComm_t dcomm(const Place& where) {
    hetcclDeviceComm_t& d = dcomms_[where.index];
    if (!d) check(hetcclDeviceCommInit(&d, comm_, where.index), comm_, "hetcclDeviceCommInit");
    return d;
  }

  // What the backend thread runs at once: one call, or a group of them (grouped).
  struct Item {
    std::vector<Done> dones;  // called when the item is finished
    double timeout = 0;       // seconds, 0: the communicator's own
    std::vector<Call> calls;
    bool grouped = false;
  };

  void check_peer(int peer, const char* op) const {
    if (peer < 0 || peer >= size_) {
      fail(std::string("hetccl backend: ") + op + " to or from rank " + std::to_string(peer) +
           ": the process group has ranks 0 to " + std::to_string(size_ - 1));
    }
    if (peer == rank_) {
      fail(std::string("hetccl backend: ") + op + " to or from rank " + std::to_string(peer) +
           ", this rank itself; send to and receive from other ranks");
    }
  }

  // Every rank makes the ids of the channels it sends on and sends all of them to every
  // peer, in one group of sends and receives on the group's communicator (which leaves
  // the numbering of the program's collectives as it is); then each rank joins its
  // 2 (size - 1) channels in one hetccl group, which creates them at once. An id names
  // a port that was free when it was made, and the kernel hands a port just released to
  // the next asker: where two ids of the table name one port, the rank that made the
  // later one makes it again, and the table goes round again (every rank sees the same
  // table, so all agree on when it is done).
  void open_channels(const std::string& settings, const std::string& host, bool key_from_env) {
    if (size_ < 2) return;
    const size_t idb = sizeof(hetcclUniqueId);
    std::vector<hetcclUniqueId> table(size_t(size_) * size_);  // [p * size + q]: p -> q
    auto port = [&](int p, int q) {
      const auto* b = reinterpret_cast<const unsigned char*>(table[p * size_ + q].internal);
      return (b[4] << 8) | b[5];  // the id's store port, big-endian at offset 4
    };
    std::vector<bool> again(size_, true);
    again[rank_] = false;
    for (int round = 0;; ++round) {
      for (int q = 0; q < size_; ++q) {
        if (!again[q]) continue;
        check(hetcclGetUniqueIdAt(&table[rank_ * size_ + q], host.c_str(), 0,
                                  key_from_env ? 1 : 0),
              nullptr, "hetcclGetUniqueIdAt (point-to-point channel)");
      }
      check(hetcclGroupStart(), nullptr, "hetcclGroupStart");
      hetcclResult_t r = hetcclSuccess;
      for (int q = 0; q < size_ && r == hetcclSuccess; ++q) {
        if (q == rank_) continue;
        r = hetcclSend(&table[rank_ * size_], size_ * idb, hetcclUint8, q, comm_, nullptr);
        if (r == hetcclSuccess) {
          r = hetcclRecv(&table[q * size_], size_ * idb, hetcclUint8, q, comm_, nullptr);
        }
      }
      hetcclResult_t end = hetcclGroupEnd();
      check(r != hetcclSuccess ? r : end, comm_,
            "hetcclSend/hetcclRecv (point-to-point channel ids)");
      std::map<int, int> seen;  // port -> times named
      bool clash = false;
      std::fill(again.begin(), again.end(), false);
      for (int p = 0; p < size_; ++p) {
        for (int q = 0; q < size_; ++q) {
          if (p == q) continue;
          if (seen[port(p, q)]++ > 0) {
            clash = true;
            if (p == rank_) again[q] = true;
          }
        }
      }
      if (!clash) break;
      if (round == 8) {
        fail("hetccl backend: the ids of the point-to-point channels kept naming one port "
             "twice after " + std::to_string(round + 1) + " rounds");
      }
    }
    std::vector<hetcclComm_t> to(size_, nullptr), from(size_, nullptr);
    // Channels stay off the timeline: as two-rank communicators their HETCCL_TRACE "%r"
    // would be 0 and 1, the names of the group's ranks 0 and 1, whose files they would
    // overwrite.
    const std::string chan = settings.empty() ? "HETCCL_TRACE=" : settings + "\nHETCCL_TRACE=";
    const char* set = chan.c_str();
    check(hetcclGroupStart(), nullptr, "hetcclGroupStart");
    hetcclResult_t r = hetcclSuccess;
    for (int q = 0; q < size_ && r == hetcclSuccess; ++q) {
      if (q == rank_) continue;
      r = hetcclCommInitRankSettings(&to[q], 2, table[rank_ * size_ + q], 0, set);
      if (r == hetcclSuccess) {
        r = hetcclCommInitRankSettings(&from[q], 2, table[q * size_ + rank_], 1, set);
      }
    }
    hetcclResult_t end = hetcclGroupEnd();
    check(r != hetcclSuccess ? r : end, nullptr,
          "hetcclCommInitRankSettings (point-to-point channels)");
    to_.resize(size_);
    from_.resize(size_);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      to_[q] = std::make_unique<Channel>(to[q], true, rank_, q);
      from_[q] = std::make_unique<Channel>(from[q], false, rank_, q);
    }
  }

  // A send or receive on its channel; inside an open batch it is recorded and posted at
  // endCoalescing.
  // A CUDA tensor travels through a host copy (see stage_in and stage_out).
  c10::intrusive_ptr<c10d::Work> post(c10d::OpType type, const at::Tensor& t, int peer, int tag) {
    auto work = c10::make_intrusive<WorkHetccl>(rank_, type, std::vector<at::Tensor>{t});
    Channel* ch = type == c10d::OpType::SEND ? to_[peer].get() : from_[peer].get();
    bool sends = type == c10d::OpType::SEND;
    at::Tensor wire = sends ? stage_in(t) : stage_out(t);
    Place where = !sends ? place_of(t) : Place{};
    Done done = [this, work, t, wire, where](std::exception_ptr e) {
      if (!e && where.device) {
        try {
          copy_back(t, wire, where);
        } catch (...) {
          e = std::current_exception();
        }
      }
      work->finish(e);
    };
    {
      std::lock_guard<std::mutex> g(m_);
      if (coalescing_) {
        batch_p2p_.push_back({ch, Channel::Op{tag, wire, std::move(done), timeout_s_.load()}});
        return work;
      }
    }
    ch->post({tag, wire, std::move(done), timeout_s_.load()});
    return work;
  }

  // Point to point and all_to_all move host memory: a CUDA tensor goes through a host
  // copy. What a call reads is copied out at issue, after the work queued on the
  // tensor's current stream (stage_in); what it writes lands in a host tensor
  // (stage_out) that copy_back copies into the CUDA tensor on the backend's stream, which
  // waited at issue for the current stream (place_of), and waits for before the Work
  // completes. CPU tensors are used as they are.
  static at::Tensor stage_in(const at::Tensor& t) { return t.is_cuda() ? t.to(at::kCPU) : t; }

  static at::Tensor stage_out(const at::Tensor& t) {
    return t.is_cuda() ? at::empty(t.sizes(), t.options().device(at::kCPU)) : t;
  }

  void copy_back(const at::Tensor& t, const at::Tensor& wire, const Place& where) {
    on_side(where, [&] { t.copy_(wire); });
  }

  // Runs `copies` (tensor copies) on the backend's stream of a CUDA call's device and
  // waits for them; on the host, runs them as they are.
  void on_side(const Place& where, const std::function<void()>& copies) {
    if (!where.device) {
      copies();
      return;
    }
    c10::Stream side = side_stream(where.index);
    c10::StreamGuard on(side);
    copies();
    side.synchronize();
  }

  static void check_pairs(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins,
                          const char* op) {
    if (outs.size() != ins.size()) {
      fail(std::string("hetccl backend: ") + op + " got " + std::to_string(ins.size()) +
           " inputs and " + std::to_string(outs.size()) + " outputs; it takes one output per input");
    }
  }

  // Rows of dimension 0 each rank gets (splits given) or equal blocks (splits empty).
  std::vector<int64_t> rows_of(const at::Tensor& t, const std::vector<int64_t>& splits,
                               const char* which) const {
    int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    if (splits.empty()) {
      if (rows % size_ != 0) {
        fail(std::string("hetccl backend: all_to_all_single's ") + which + " has " +
             std::to_string(rows) + " rows, not a multiple of the world size (" +
             std::to_string(size_) + "); pass split sizes");
      }
      return std::vector<int64_t>(size_, rows / size_);
    }
    int64_t sum = 0;
    for (int64_t s : splits) {
      if (s < 0) fail(std::string("hetccl backend: all_to_all_single: a negative ") + which +
                      " split size (" + std::to_string(s) + ")");
      sum += s;
    }
    if (static_cast<int>(splits.size()) != size_ || sum != rows) {
      fail(std::string("hetccl backend: all_to_all_single's ") + which + " split sizes (" +
           std::to_string(splits.size()) + " of them, summing to " + std::to_string(sum) +
           ") must be one per rank (" + std::to_string(size_) + ") and sum to its " +
           std::to_string(rows) + " rows");
    }
    return splits;
  }

  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, std::vector<at::Tensor> outputs,
                                         std::function<void()> issue,
                                         std::function<void()> after = nullptr,
                                         bool device = false) {
    auto work = c10::make_intrusive<WorkHetccl>(rank_, type, std::move(outputs));
    {
      std::lock_guard<std::mutex> g(m_);
      if (coalescing_) {
        batch_.emplace_back(work, Call{std::move(issue), std::move(after), device});
        return work;
      }
    }
    Item item;
    item.dones.push_back([work](std::exception_ptr e) { work->finish(e); });
    item.calls.push_back({std::move(issue), std::move(after), device});
    push(std::move(item));
    return work;
  }

  // A call made of several C API calls that must run as one group (all_to_all); result:
  // what its Work returns. Inside an open batch the calls join the batch's group.
  c10::intrusive_ptr<c10d::Work> enqueue_group(c10d::OpType type, std::vector<at::Tensor> result,
                                               std::vector<Call> calls) {
    auto work = c10::make_intrusive<WorkHetccl>(rank_, type, std::move(result));
    {
      std::lock_guard<std::mutex> g(m_);
      if (coalescing_) {
        for (size_t k = 0; k < calls.size(); ++k) {
          batch_.emplace_back(k + 1 == calls.size() ? work : nullptr, std::move(calls[k]));
        }
        return work;
      }
    }
    Item item;
    item.grouped = true;
    item.dones.push_back([work](std::exception_ptr e) { work->finish(e); });
    item.calls = std::move(calls);
    push(std::move(item));
    return work;
  }

  // Runs `record` (calls of this backend; it returns the last one's Work) as one batch,
  // unless a batch is already open, which they then join: every call of a batch
  // completes at once, so the last call's Work stands for all of them.
  c10::intrusive_ptr<c10d::Work> coalesced(
      const std::function<c10::intrusive_ptr<c10d::Work>()>& record) {
    bool open;
    {
      std::lock_guard<std::mutex> g(m_);
      open = coalescing_;
    }
    if (open) {
      auto last = record();
      if (!last) fail("hetccl backend: a coalesced call with no tensors");
      return last;
    }
    startCoalescing();
    try {
      record();
    } catch (...) {
      std::lock_guard<std::mutex> g(m_);
      coalescing_ = false;
      batch_.clear();
      batch_p2p_.clear();
      throw;
    }
    return endCoalescing();
  }

  void push(Item item) {
    item.timeout = timeout_s_.load();
    {
      std::lock_guard<std::mutex> g(m_);
      queue_.push_back(std::move(item));
    }
    cv_.notify_one();
  }

  // One item on the backend thread. A group is closed even when a call in it failed
  // (hetcclGroupEnd then runs none of it), so the thread's group state starts afresh.
  void execute(Item& item) {
    if (item.timeout > 0 && item.timeout != applied_timeout_) {
      check(hetcclCommSetTimeout(comm_, item.timeout), comm_, "hetcclCommSetTimeout");
      applied_timeout_ = item.timeout;
    }
    if (!item.grouped) {
      for (auto& c : item.calls) c.issue();
    } else {
      check(hetcclGroupStart(), comm_, "hetcclGroupStart");
      try {
        for (auto& c : item.calls) c.issue();
      } catch (...) {
        (void)hetcclGroupEnd();
        throw;
      }
      check(hetcclGroupEnd(), comm_, "hetcclGroupEnd");
    }
    for (auto& c : item.calls) {
      if (c.after) c.after();
    }
  }

  void run() {
    for (;;) {
      Item item;
      {
        std::unique_lock<std::mutex> g(m_);
        cv_.wait(g, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr e;
      try {
        execute(item);
      } catch (...) {
        e = std::current_exception();
        failed_ = true;
      }
      for (auto& d : item.dones) d(e);
    }
  }

  hetcclComm_t comm_ = nullptr;
  std::map<int, hetcclDeviceComm_t> dcomms_;  // by CUDA device index; backend thread only
  std::mutex side_m_;
  std::map<int, c10::Stream> side_;  // the backend's stream per CUDA device index
  std::thread thread_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool coalescing_ = false;
  // Recorded between startCoalescing and endCoalescing; a null Work: a call whose Work
  // is another entry's (the parts of an all_to_all).
  std::vector<std::pair<c10::intrusive_ptr<WorkHetccl>, Call>> batch_;
  std::vector<std::pair<Channel*, Channel::Op>> batch_p2p_;  // sends and receives of it
  // Point-to-point channels, by peer: to_[q] carries this rank's sends to q, from_[q]
  // q's to this rank (none at this rank's own index).
  std::vector<std::unique_ptr<Channel>> to_, from_;
  bool stop_ = false;
  bool failed_ = false;
  std::atomic<double> timeout_s_{0};  // set_timeout's, 0: never called
  double applied_timeout_ = 0;        // the backend thread's
};

pybind11::bytes unique_id(std::optional<std::string> host, int port, bool key_from_env) {
  hetcclUniqueId id;
  check(hetcclGetUniqueIdAt(&id, host ? host->c_str() : nullptr, port, key_from_env ? 1 : 0),
        nullptr, "hetcclGetUniqueIdAt");
  return pybind11::bytes(id.internal, sizeof(id.internal));
}

}  // namespace hetccl_torch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("unique_id", &hetccl_torch::unique_id, pybind11::arg("host"), pybind11::arg("port"),
        pybind11::arg("key_from_env"));
  pybind11::class_<hetccl_torch::BackendHetccl, c10d::Backend,
                   c10::intrusive_ptr<hetccl_torch::BackendHetccl>>(m, "BackendHetccl")
      .def(pybind11::init([](int rank, int size, pybind11::bytes id, const std::string& settings,
                             const std::string& p2p_host, bool key_from_env) {
             return c10::make_intrusive<hetccl_torch::BackendHetccl>(
                 rank, size, std::string(id), settings, p2p_host, key_from_env);
           }),
           pybind11::arg("rank"), pybind11::arg("size"), pybind11::arg("id"),
           pybind11::arg("settings"), pybind11::arg("p2p_host"), pybind11::arg("key_from_env"));
}
