// hetccl as a c10d Backend: CPU tensors through bindings/hetccl.h.
//
// The C API is synchronous, so every call runs on one thread of this backend, in the
// order the program issued them (the order every rank issues them in, which the
// collectives need); the Work returned at once completes when that thread has run the
// call. A failed call's message is hetccl's own (hetcclGetLastError, read on the thread
// that made the call), raised as torch.distributed.DistBackendError.
#include <torch/extension.h>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

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
    return enqueue(c10d::OpType::ALLGATHER, out, [=, this] {
      at::Tensor flat = at::empty({n * in.numel()}, in.options());
      check(hetcclAllGather(in.data_ptr(), flat.data_ptr(), in.numel(), dt, comm_, nullptr),
            comm_, "hetcclAllGather");
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
    auto dt = dtype_of(t);
    return enqueue(c10d::OpType::SEND, {t}, [=, this] {
      check(hetcclSend(t.data_ptr(), t.numel(), dt, dst, comm_, nullptr), comm_, "hetcclSend");
    });
  }

  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& ts, int src, int tag) override {
    at::Tensor t = one_cpu(ts, "recv");
    check_cpu(t, "recv");
    check_tag(tag, "recv");
    auto dt = dtype_of(t);
    return enqueue(c10d::OpType::RECV, {t}, [=, this] {
      check(hetcclRecv(t.data_ptr(), t.numel(), dt, src, comm_, nullptr), comm_, "hetcclRecv");
    });
  }

 private:
  static void check_tag(int tag, const char* op) {
    if (tag != 0) {
      fail(std::string("hetccl backend: ") + op + " with tag " + std::to_string(tag) +
           ": hetccl matches messages by order, not tags; use tag 0");
    }
  }

  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, std::vector<at::Tensor> outputs,
                                         std::function<void()> call) {
    auto work = c10::make_intrusive<WorkHetccl>(rank_, type, std::move(outputs));
    {
      std::lock_guard<std::mutex> g(m_);
      queue_.emplace_back(work, std::move(call));
    }
    cv_.notify_one();
    return work;
  }

  void run() {
    for (;;) {
      std::pair<c10::intrusive_ptr<WorkHetccl>, std::function<void()>> item;
      {
        std::unique_lock<std::mutex> g(m_);
        cv_.wait(g, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        item = std::move(queue_.front());
        queue_.pop_front();
      }
      std::exception_ptr e;
      try {
        item.second();
      } catch (...) {
        e = std::current_exception();
        failed_ = true;
      }
      item.first->finish(e);
    }
  }

  hetcclComm_t comm_ = nullptr;
  std::thread thread_;
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<std::pair<c10::intrusive_ptr<WorkHetccl>, std::function<void()>>> queue_;
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
