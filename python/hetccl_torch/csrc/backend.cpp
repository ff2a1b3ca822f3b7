// hetccl as a c10d Backend: CPU tensors through bindings/hetccl.h.
//
// The C API is synchronous, so every call runs on one thread of this backend, in the
// order the program issued them (the order every rank issues them in, which the
// collectives need); the Work returned at once completes when that thread has run the
// call. A failed call's message is hetccl's own (hetcclGetLastError, read on the thread
// that made the call), raised as torch.distributed.DistBackendError.
//
// Coalescing (batch_isend_irecv, _coalescing_manager): between startCoalescing and
// endCoalescing the calls are only recorded; endCoalescing queues them as one item that
// the backend thread runs between hetcclGroupStart and hetcclGroupEnd, where hetccl
// orders the sends and receives so that no exchange deadlocks (a ring of sends and
// receives included). all_to_all is such a group too: per peer, a send of its block and
// a receive of the peer's. Isolated isend/irecv run one after another as issued: a
// ring of them deadlocks once a message outgrows the link's buffering, as with NCCL
// outside a group.
#include <torch/extension.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
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

void check_cpu(const at::Tensor& t, const char* op) {
  if (!t.device().is_cpu()) {
    fail(std::string("hetccl backend: ") + op + " got a tensor on " + t.device().str() +
         "; this backend moves CPU tensors (use backend=\"cpu:hetccl,cuda:nccl\" for GPUs)");
  }
  if (t.is_sparse() || !t.is_contiguous()) {
    fail(std::string("hetccl backend: ") + op + " needs a dense contiguous tensor");
  }
  (void)dtype_of(t);
}

class WorkHetccl : public c10d::Work {
 public:
  WorkHetccl(int rank, c10d::OpType type, std::vector<at::Tensor> outputs)
      : c10d::Work(rank, type),
        outputs_(std::move(outputs)),
        future_(c10::make_intrusive<c10::ivalue::Future>(
            c10::ListType::create(c10::TensorType::get()))) {}

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

class BackendHetccl : public c10d::Backend {
 public:
  BackendHetccl(int rank, int size, const std::string& id, const std::string& settings)
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
    }
    thread_ = std::thread([this] { run(); });
  }

  ~BackendHetccl() override {
    {
      std::lock_guard<std::mutex> g(m_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
    if (comm_) (failed_ ? hetcclCommAbort(comm_) : hetcclCommDestroy(comm_));
  }

  const std::string getBackendName() const override { return "hetccl"; }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& ts,
                                          const c10d::AllreduceOptions& o) override {
    at::Tensor t = one_cpu(ts, "all_reduce");
    check_cpu(t, "all_reduce");
    auto dt = dtype_of(t);
    auto op = op_of(o.reduceOp);
    return enqueue(c10d::OpType::ALLREDUCE, {t}, [=, this] {
      check(hetcclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), dt, op, comm_, nullptr),
            comm_, "hetcclAllReduce");
    });
  }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& ts,
                                          const c10d::BroadcastOptions& o) override {
    at::Tensor t = one_cpu(ts, "broadcast");
    check_cpu(t, "broadcast");
    auto dt = dtype_of(t);
    int root = static_cast<int>(o.rootRank);
    return enqueue(c10d::OpType::BROADCAST, {t}, [=, this] {
      check(hetcclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), dt, root, comm_, nullptr),
            comm_, "hetcclBroadcast");
    });
  }

  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& ts,
                                       const c10d::ReduceOptions& o) override {
    at::Tensor t = one_cpu(ts, "reduce");
    check_cpu(t, "reduce");
    auto dt = dtype_of(t);
    auto op = op_of(o.reduceOp);
    int root = static_cast<int>(o.rootRank);
    bool is_root = root == rank_;
    return enqueue(c10d::OpType::REDUCE, {t}, [=, this] {
      check(hetcclReduce(t.data_ptr(), is_root ? t.data_ptr() : nullptr, t.numel(), dt, op,
                         root, comm_, nullptr),
            comm_, "hetcclReduce");
    });
  }

  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outs,
                                          std::vector<at::Tensor>& ins,
                                          const c10d::AllgatherOptions&) override {
    at::Tensor in = one_cpu(ins, "all_gather");
    check_cpu(in, "all_gather");
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
    }
    auto dt = dtype_of(in);
    int n = size_;
    // Gathered into one buffer, copied out once the call (or its group) has run.
    at::Tensor flat = at::empty({n * in.numel()}, in.options());
    return enqueue(
        c10d::OpType::ALLGATHER, out,
        [=, this] {
          check(hetcclAllGather(in.data_ptr(), flat.data_ptr(), in.numel(), dt, comm_,
                                nullptr),
                comm_, "hetcclAllGather");
        },
        [=] {
          for (int r = 0; r < n; ++r) {
            out[r].view({-1}).copy_(flat.narrow(0, r * in.numel(), in.numel()));
          }
        });
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& out, at::Tensor& in,
                                                const c10d::AllgatherOptions&) override {
    check_cpu(in, "all_gather_into_tensor");
    check_cpu(out, "all_gather_into_tensor");
    if (out.numel() != in.numel() * size_ || out.scalar_type() != in.scalar_type()) {
      fail("hetccl backend: all_gather_into_tensor's output has " +
           std::to_string(out.numel()) + " elements; it must have world size (" +
           std::to_string(size_) + ") times the input's " + std::to_string(in.numel()) +
           ", of the same dtype");
    }
    auto dt = dtype_of(in);
    return enqueue(c10d::OpType::_ALLGATHER_BASE, {out}, [=, this] {
      check(hetcclAllGather(in.data_ptr(), out.data_ptr(), in.numel(), dt, comm_, nullptr),
            comm_, "hetcclAllGather");
    });
  }

  c10::intrusive_ptr<c10d::Work> all_gather_single(at::Tensor& out, at::Tensor& in,
                                                  const c10d::AllgatherOptions& o) override {
    return _allgather_base(out, in, o);
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& out, at::Tensor& in, const c10d::ReduceScatterOptions& o) override {
    check_cpu(in, "reduce_scatter_tensor");
    check_cpu(out, "reduce_scatter_tensor");
    if (in.numel() != out.numel() * size_ || out.scalar_type() != in.scalar_type()) {
      fail("hetccl backend: reduce_scatter_tensor's input has " +
           std::to_string(in.numel()) + " elements; it must have world size (" +
           std::to_string(size_) + ") times the output's " + std::to_string(out.numel()) +
           ", of the same dtype");
    }
    auto dt = dtype_of(in);
    auto op = op_of(o.reduceOp);
    return enqueue(c10d::OpType::_REDUCE_SCATTER_BASE, {out}, [=, this] {
      check(hetcclReduceScatter(in.data_ptr(), out.data_ptr(), out.numel(), dt, op, comm_,
                                nullptr),
            comm_, "hetcclReduceScatter");
    });
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
    check_cpu(t, "send");
    check_tag(tag, "send");
    check_peer(dst, "send");
    auto dt = dtype_of(t);
    return enqueue(c10d::OpType::SEND, {t}, [=, this] {
      check(hetcclSend(t.data_ptr(), t.numel(), dt, dst, comm_, nullptr), comm_, "hetcclSend");
    });
  }

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& ts, int src, int tag) override {
    at::Tensor t = one_cpu(ts, "recv");
    check_cpu(t, "recv");
    check_tag(tag, "recv");
    check_peer(src, "recv");
    auto dt = dtype_of(t);
    return enqueue(c10d::OpType::RECV, {t}, [=, this] {
      check(hetcclRecv(t.data_ptr(), t.numel(), dt, src, comm_, nullptr), comm_, "hetcclRecv");
    });
  }

  // all_to_all_single: rank r's input rows [in_off[p], in_off[p] + in_rows[p]) go to
  // rank p, which receives them at its rows [out_off[r], ...). Equal blocks of
  // size(0) / world size rows when the split sizes are empty.
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& out, at::Tensor& in,
                                              std::vector<int64_t>& out_splits,
                                              std::vector<int64_t>& in_splits,
                                              const c10d::AllToAllOptions&) override {
    check_cpu(in, "all_to_all_single");
    check_cpu(out, "all_to_all_single");
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
    std::vector<Call> calls;
    int64_t in_off = 0, out_off = 0;
    for (int p = 0; p < size_; ++p) {
      int64_t src = in_off * row, dst = out_off * row;
      size_t n_send = in_rows[p] * row, n_recv = out_rows[p] * row;
      // The captured tensors keep both buffers alive until the group has run.
      calls.push_back({[=, this] {
                         char* s = static_cast<char*>(in.data_ptr()) + src * in.element_size();
                         char* d = static_cast<char*>(out.data_ptr()) + dst * out.element_size();
                         check(hetcclSend(s, n_send, dt, p, comm_, nullptr), comm_,
                               "hetcclSend (all_to_all_single)");
                         check(hetcclRecv(d, n_recv, dt, p, comm_, nullptr), comm_,
                               "hetcclRecv (all_to_all_single)");
                       },
                       nullptr});
      in_off += in_rows[p];
      out_off += out_rows[p];
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
      check_cpu(i, "all_to_all");
      check_cpu(o, "all_to_all");
      if (i.scalar_type() != o.scalar_type()) {
        fail("hetccl backend: all_to_all's input " + std::to_string(p) + " is " +
             c10::toString(i.scalar_type()) + " and its output " + std::to_string(p) + " " +
             c10::toString(o.scalar_type()) + "; they must be of one dtype");
      }
      auto dt = dtype_of(i);
      calls.push_back({[=, this] {
                         check(hetcclSend(i.data_ptr(), i.numel(), dt, p, comm_, nullptr),
                               comm_, "hetcclSend (all_to_all)");
                         check(hetcclRecv(o.data_ptr(), o.numel(), dt, p, comm_, nullptr),
                               comm_, "hetcclRecv (all_to_all)");
                       },
                       nullptr});
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
    {
      std::lock_guard<std::mutex> g(m_);
      if (!coalescing_) {
        fail("hetccl backend: endCoalescing without startCoalescing");
      }
      coalescing_ = false;
      batch.swap(batch_);
    }
    std::vector<at::Tensor> outputs;
    Item item;
    item.grouped = true;
    for (auto& [w, c] : batch) {
      if (w) {
        for (const auto& t : w->outputs()) outputs.push_back(t);
        item.works.push_back(w);
      }
      item.calls.push_back(std::move(c));
    }
    auto work = c10::make_intrusive<WorkHetccl>(rank_, c10d::OpType::COALESCED, outputs);
    item.works.push_back(work);
    push(std::move(item));
    return work;
  }

 private:
  // One C API call (issue), and what must wait until it has run (after): inside a group
  // the call only returns at hetcclGroupEnd, so copies out of its buffers wait for that.
  struct Call {
    std::function<void()> issue;
    std::function<void()> after;
  };

  // What the backend thread runs at once: one call, or a group of them (grouped).
  struct Item {
    std::vector<c10::intrusive_ptr<WorkHetccl>> works;  // finished when the item is
    std::vector<Call> calls;
    bool grouped = false;
  };

  static void check_tag(int tag, const char* op) {
    if (tag != 0) {
      fail(std::string("hetccl backend: ") + op + " with tag " + std::to_string(tag) +
           ": hetccl matches messages by order, not tags; use tag 0");
    }
  }

  void check_peer(int peer, const char* op) const {
    if (peer < 0 || peer >= size_) {
      fail(std::string("hetccl backend: ") + op + " to or from rank " + std::to_string(peer) +
           ": the process group has ranks 0 to " + std::to_string(size_ - 1));
    }
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
                                         std::function<void()> after = nullptr) {
    auto work = c10::make_intrusive<WorkHetccl>(rank_, type, std::move(outputs));
    {
      std::lock_guard<std::mutex> g(m_);
      if (coalescing_) {
        batch_.emplace_back(work, Call{std::move(issue), std::move(after)});
        return work;
      }
    }
    Item item;
    item.works.push_back(work);
    item.calls.push_back({std::move(issue), std::move(after)});
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
    item.works.push_back(work);
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
      throw;
    }
    return endCoalescing();
  }

  void push(Item item) {
    {
      std::lock_guard<std::mutex> g(m_);
      queue_.push_back(std::move(item));
    }
    cv_.notify_one();
  }

  // One item on the backend thread. A group is closed even when a call in it failed
  // (hetcclGroupEnd then runs none of it), so the thread's group state starts afresh.
  void execute(Item& item) {
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
      for (auto& w : item.works) w->finish(e);
    }
  }

  hetcclComm_t comm_ = nullptr;
  std::thread thread_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool coalescing_ = false;
  // Recorded between startCoalescing and endCoalescing; a null Work: a call whose Work
  // is another entry's (the parts of an all_to_all).
  std::vector<std::pair<c10::intrusive_ptr<WorkHetccl>, Call>> batch_;
  bool stop_ = false;
  bool failed_ = false;
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
      .def(pybind11::init([](int rank, int size, pybind11::bytes id, const std::string& settings) {
             return c10::make_intrusive<hetccl_torch::BackendHetccl>(rank, size, std::string(id),
                                                                    settings);
           }),
           pybind11::arg("rank"), pybind11::arg("size"), pybind11::arg("id"),
           pybind11::arg("settings"));
}
