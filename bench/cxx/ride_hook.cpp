// A DDP communication hook in C++ that carries the agreement's code the way threadlet/ddp_hook.py's
// PiggybackTransport.ride does (the first bucket, divided by the world size, with WIDTH counts
// appended to the same all-reduce), but with no Python on the backward's path: no Python call per
// bucket, no Python callback on gloo's thread, no GIL. A measurement of that design for
// bench/agreement_cost.py --backward --cxx (docs/benchmarks.md), not part of torchloom: the code is
// written by the caller at the step boundary and the summed code read back there.
#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

namespace {

class RideHook : public c10d::CommHookInterface {
 public:
  RideHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, at::Tensor code, at::Tensor sums)
      : pg_(std::move(pg)), code_(std::move(code)), sums_(std::move(sums)), width_(code_.numel()) {}

  bool plain = false;  // DDP's own reduction for every bucket (the cost of a registered C++ hook alone)

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    auto& buffer = bucket.getBufferRef();
    const int64_t world = pg_->getSize();
    if (plain || bucket.getIndex() != 0) {  // DDP's own reduction
      buffer.div_(world);
      std::vector<at::Tensor> tensors{buffer};
      return pg_->allreduce(tensors)->getFuture();
    }
    const int64_t n = buffer.numel();
    if (!buf_.defined() || buf_.numel() != n + width_ || buf_.scalar_type() != buffer.scalar_type() ||
        buf_.device() != buffer.device()) {
      buf_ = at::empty({n + width_}, buffer.options());  // once: the bucket's size is fixed after step 1
    }
    n_ = n;
    auto head = buf_.narrow(0, 0, n);
    at::div_out(head, buffer, world);
    buf_.narrow(0, n, width_).copy_(code_);
    std::vector<at::Tensor> tensors{buf_};
    return pg_->allreduce(tensors)->getFuture();
  }

  // Called by DDP on the autograd thread once the all-reduce is done: keep the summed code, hand
  // DDP the bucket's part.
  at::Tensor parseHookResult(const c10::IValue& result) override {
    auto out = c10d::detail::parseCppCommHookResult(result);
    if (n_ >= 0 && out.is_same(buf_)) {
      sums_.copy_(buf_.narrow(0, n_, width_));
      return buf_.narrow(0, 0, n_);
    }
    return out;
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  at::Tensor code_, sums_, buf_;
  int64_t width_;
  int64_t n_ = -1;
};

}  // namespace

void install(py::object reducer, py::object process_group, at::Tensor code, at::Tensor sums, bool plain) {
  auto r = reducer.cast<std::shared_ptr<c10d::Reducer>>();
  auto pg = process_group.cast<c10::intrusive_ptr<c10d::ProcessGroup>>();
  auto hook = std::make_unique<RideHook>(pg, code, sums);
  hook->plain = plain;
  r->register_comm_hook(std::move(hook));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("install", &install); }
