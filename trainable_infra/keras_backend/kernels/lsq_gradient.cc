// LSQ's backward pass for a per-tensor quantizer in one pass over the activation.
//
// TensorFlow's FakeQuantWithMinMaxVarsGradient gives the input gradient and the sums of the upstream gradient
// below and above the range; LSQ also needs the sum of dx·(Q(x) − x) inside the range. As separate TensorFlow ops
// that is a subtraction, a product and two reductions after the gradient op: eleven passes over the tensor. This
// op reads the upstream gradient, x and Q(x) once and writes the input gradient: four.
//
// The input gradient is the gradient op's, element for element: TensorFlow's own Nudge (from its header) gives
// the range and the element is dy·1 or dy·0 as there. The three sums are taken in float over fixed blocks and the
// block sums added in double, so the result does not depend on how many threads ran the blocks.

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/kernels/fake_quant_ops_functor.h"
#include "tensorflow/core/util/work_sharder.h"

namespace trainable_infra {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

constexpr int64_t kBlock = 4096;  // elements per block: each of 16 lanes adds 256 terms in float

REGISTER_OP("TrainableInfraFakeQuantLsqGradient")
    .Input("gradients: float")
    .Input("inputs: float")
    .Input("outputs: float")
    .Input("min: float")
    .Input("max: float")
    .Attr("num_bits: int = 8")
    .Attr("narrow_range: bool = false")
    .Output("backprops_wrt_input: float")
    .Output("backprop_wrt_min: float")
    .Output("backprop_wrt_max: float")
    .Output("rounding_error: float")
    .SetShapeFn([](InferenceContext* c) {
      ::tensorflow::shape_inference::ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &unused));
      TF_RETURN_IF_ERROR(c->Merge(c->input(1), c->input(2), &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(3), 0, &unused));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(4), 0, &unused));
      c->set_output(0, c->input(1));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      c->set_output(3, c->Scalar());
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
FakeQuantWithMinMaxVarsGradient's outputs and the sum of dx·(outputs − inputs), which is NaN where any input is
NaN and takes a zero dx as a zero term (multiply_no_nan: clipped ±Inf inputs add nothing).
)doc");

// Four floats, with GCC's vector extensions (GCC and Clang, any target): the loop below is written in them
// because the compiler does not vectorize it from scalar code (a comparison per element reads as a branch).
typedef float Floats __attribute__((vector_size(16)));
typedef int32_t Masks __attribute__((vector_size(16)));
constexpr int kWidth = 4;
constexpr int kVectors = 4;  // four independent accumulators of each sum: sixteen lanes in all

inline Floats Load(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void Store(float* p, Floats v) { std::memcpy(p, &v, sizeof(v)); }

// 1.0f where the mask is set, 0.0f elsewhere: what the gradient op multiplies by.
inline Floats OneWhere(Masks mask) {
  const Masks one_bits = {0x3f800000, 0x3f800000, 0x3f800000, 0x3f800000};
  return reinterpret_cast<Floats>(mask & one_bits);
}

// a·b, or +0 where b == 0 even when a is ±Inf or NaN (TensorFlow's MulNoNan).
inline Floats MultiplyNoNan(Floats a, Floats b) {
  const Floats zero = {};
  return reinterpret_cast<Floats>(reinterpret_cast<Masks>(a * b) & (b != zero));
}

inline float MultiplyNoNan(float a, float b) { return b == 0.0f ? 0.0f : a * b; }

struct BlockSums {
  double below = 0.0, above = 0.0, rounding = 0.0;
  bool nan_input = false;
};

// The gradient op's input gradient for one block, and the block's sums. dx may be dy's buffer (forwarded).
// kPassesAll: min == max == 0, where the gradient op copies dy to dx (also where x is NaN).
template <bool kPassesAll>
BlockSums SumBlock(const float* dy, const float* x, const float* y, float* dx, int64_t size, float nudged_min,
                   float nudged_max) {
  Floats below[kVectors] = {}, above[kVectors] = {}, rounding[kVectors] = {};
  Masks nan[kVectors] = {};
  const Floats low = {nudged_min, nudged_min, nudged_min, nudged_min};
  const Floats high = {nudged_max, nudged_max, nudged_max, nudged_max};
  int64_t i = 0;
  for (; i + kWidth * kVectors <= size; i += kWidth * kVectors) {
    for (int k = 0; k < kVectors; ++k) {
      const int64_t at = i + k * kWidth;
      const Floats xs = Load(x + at);
      const Floats gs = Load(dy + at);
      const Floats d = kPassesAll ? gs : gs * OneWhere((xs >= low) & (xs <= high));
      Store(dx + at, d);
      below[k] += gs * OneWhere(xs < low);
      above[k] += gs * OneWhere(xs > high);
      rounding[k] += MultiplyNoNan(Load(y + at) - xs, d);
      nan[k] |= xs != xs;
    }
  }
  float tail_below = 0.0f, tail_above = 0.0f, tail_rounding = 0.0f;
  bool tail_nan = false;
  for (; i < size; ++i) {
    const float xi = x[i];
    const float gi = dy[i];
    const float d = kPassesAll ? gi : gi * ((xi >= nudged_min && xi <= nudged_max) ? 1.0f : 0.0f);
    dx[i] = d;
    tail_below += gi * (xi < nudged_min ? 1.0f : 0.0f);
    tail_above += gi * (xi > nudged_max ? 1.0f : 0.0f);
    tail_rounding += MultiplyNoNan(y[i] - xi, d);
    tail_nan |= xi != xi;
  }
  BlockSums sums;
  for (int k = 0; k < kVectors; ++k) {
    for (int j = 0; j < kWidth; ++j) {
      sums.below += below[k][j];
      sums.above += above[k][j];
      sums.rounding += rounding[k][j];
      sums.nan_input |= nan[k][j] != 0;
    }
  }
  sums.below += tail_below;
  sums.above += tail_above;
  sums.rounding += tail_rounding;
  sums.nan_input |= tail_nan;
  return sums;
}

class FakeQuantLsqGradientOp : public OpKernel {
 public:
  explicit FakeQuantLsqGradientOp(OpKernelConstruction* context) : OpKernel(context) {
    int num_bits;
    OP_REQUIRES_OK(context, context->GetAttr("num_bits", &num_bits));
    OP_REQUIRES(context, num_bits >= 2 && num_bits <= 16,
                ::tensorflow::errors::InvalidArgument("num_bits must be between 2 and 16, inclusive"));
    bool narrow_range;
    OP_REQUIRES_OK(context, context->GetAttr("narrow_range", &narrow_range));
    quant_min_ = narrow_range ? 1 : 0;
    quant_max_ = (1 << num_bits) - 1;
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& gradients = context->input(0);
    const Tensor& inputs = context->input(1);
    const Tensor& outputs = context->input(2);
    OP_REQUIRES(context, gradients.shape() == inputs.shape() && outputs.shape() == inputs.shape(),
                ::tensorflow::errors::InvalidArgument("gradients, inputs and outputs must have one shape"));
    OP_REQUIRES(context,
                ::tensorflow::TensorShapeUtils::IsScalar(context->input(3).shape()) &&
                    ::tensorflow::TensorShapeUtils::IsScalar(context->input(4).shape()),
                ::tensorflow::errors::InvalidArgument("min and max must be scalars"));
    const float min = context->input(3).scalar<float>()();
    const float max = context->input(4).scalar<float>()();

    Tensor* backprops = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, inputs.shape(), &backprops));
    const int64_t n = inputs.NumElements();
    const float* dy = gradients.flat<float>().data();
    const float* x = inputs.flat<float>().data();
    const float* y = outputs.flat<float>().data();
    float* dx = backprops->flat<float>().data();

    // The gradient op passes everything through for min == max == 0 (no range: nothing below or above it).
    float nudged_min = -std::numeric_limits<float>::infinity();
    float nudged_max = std::numeric_limits<float>::infinity();
    const bool passes_all = min == 0.0f && max == 0.0f;
    if (!passes_all) {
      float scale, inv_scale;
      ::tensorflow::Nudge(min, max, quant_min_, quant_max_, &nudged_min, &nudged_max, &scale, &inv_scale);
    }

    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<BlockSums> sums(blocks);
    auto work = [&](int64_t first, int64_t last) {
      for (int64_t block = first; block < last; ++block) {
        const int64_t begin = block * kBlock;
        const int64_t size = std::min(kBlock, n - begin);
        sums[block] = passes_all
                          ? SumBlock<true>(dy + begin, x + begin, y + begin, dx + begin, size, nudged_min, nudged_max)
                          : SumBlock<false>(dy + begin, x + begin, y + begin, dx + begin, size, nudged_min, nudged_max);
      }
    };
    auto* threads = context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(threads->num_threads, threads->workers, blocks, kBlock * 8, work);

    BlockSums total;
    for (const BlockSums& s : sums) {
      total.below += s.below;
      total.above += s.above;
      total.rounding += s.rounding;
      total.nan_input |= s.nan_input;
    }
    const float nan = std::numeric_limits<float>::quiet_NaN();
    SetScalar(context, 1, passes_all ? 0.0f : static_cast<float>(total.below));
    SetScalar(context, 2, passes_all ? 0.0f : static_cast<float>(total.above));
    SetScalar(context, 3, total.nan_input ? nan : static_cast<float>(total.rounding));
  }

 private:
  static void SetScalar(OpKernelContext* context, int index, float value) {
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(index, TensorShape({}), &output));
    output->scalar<float>()() = value;
  }

  int quant_min_;
  int quant_max_;
};

REGISTER_KERNEL_BUILDER(Name("TrainableInfraFakeQuantLsqGradient").Device(::tensorflow::DEVICE_CPU),
                        FakeQuantLsqGradientOp);

}  // namespace
}  // namespace trainable_infra
