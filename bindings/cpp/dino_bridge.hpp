// dino_bridge.hpp: header-only C++17 wrapper over the dino-bridge C API (ABI version 5).
//
//   dino_bridge::Bridge bridge = dino_bridge::Bridge::open("bridge.safetensors");
//   std::vector<float> tokens(bridge.token_elems(batch));
//   bridge.forward(latents, tokens, batch);                  // the stored latent size
//   auto t = bridge.forward(latents, batch, 32, 48);          // latents [batch, C, 32, 48]
//   float loss = bridge.loss_backward(pred, latents, grad, batch, 32, 48, 16, 24);
//   bridge.forward(lat_tensor, out_tensor);                   // DLPack: DLTensor descriptors
//
// - `Bridge` owns one handle (move-only; the destructor frees it). Opening one checks that
//   the library's `bridge_abi_version()` is the header's `BRIDGE_ABI_VERSION` and throws
//   `Error` (BRIDGE_ERR_ABI_MISMATCH, naming both) when they differ.
// - Every failure throws `dino_bridge::Error` carrying the C status and the library's
//   message; size mismatches throw it with BRIDGE_ERR_INVALID_ARGUMENT before any call.
// - Latent sizes: every compute method has an overload without `height, width` (the
//   bridge's stored `latent_size` square, from `bridge_get_info`) and one with them (any
//   sides that are multiples of 2^adapter_depth). Tokens lie on the grid
//   `token_grid(height, width) = (height, width) / 2^adapter_depth`. `loss_backward` takes
//   the caller's token grid `pred_h, pred_w` (the bridge's, k times it, or 1/k of it).
// - Buffers are views (`Span<T>`: pointer + element count, from a std::vector or raw
//   memory); nothing is copied or retained. `float` means BRIDGE_DTYPE_F32; pass
//   `Span<const uint16_t>` plus `DType::F16` / `DType::BF16` for half-precision data.
// - (ABI 3) Every compute method also takes DLPack descriptors (`const DLTensor&`, e.g.
//   from a framework's DLPack export, or `Tensor` below for host memory): shapes, dtypes
//   (each tensor its own) and devices come from the descriptors, and the library checks
//   them. `capabilities()` describes the library; `set_log_callback` routes its messages.
//   Including the real dlpack.h before this header is fine: its declarations serve.
// - (ABI 5) Training in the host's own stack: the bridge as a function of one flat float32
//   parameter vector (`param_count`, `param_info`, `get_params` / `set_params`), the
//   training loss's gradient (`loss_grads`), a training-mode forward and its VJP
//   (`forward_train`, `vjp`: one seed, one set of dropout masks), and one step of the
//   handle's AdamW with a gradient the host gives (`apply_grads`, e.g. after its NCCL
//   all-reduce). examples/data_parallel.cpp trains two handles on two threads this way.
// - Thread-safety is the C API's: forward and loss calls may run concurrently on one
//   Bridge; train_step, apply_grads and set_params exclude them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "dino_bridge.h"

static_assert(BRIDGE_ABI_VERSION == 5, "dino_bridge.hpp is written for ABI version 5 of dino_bridge.h");

namespace dino_bridge {

enum class DType : int32_t { F32 = BRIDGE_DTYPE_F32, F16 = BRIDGE_DTYPE_F16, BF16 = BRIDGE_DTYPE_BF16 };

inline const char* status_name(int32_t status) {
    switch (status) {
        case BRIDGE_OK: return "OK";
        case BRIDGE_ERR_INVALID_ARGUMENT: return "INVALID_ARGUMENT";
        case BRIDGE_ERR_SHAPE: return "SHAPE";
        case BRIDGE_ERR_IO: return "IO";
        case BRIDGE_ERR_CHECKPOINT: return "CHECKPOINT";
        case BRIDGE_ERR_UNSUPPORTED: return "UNSUPPORTED";
        case BRIDGE_ERR_DEVICE: return "DEVICE";
        case BRIDGE_ERR_NON_FINITE: return "NON_FINITE";
        case BRIDGE_ERR_INTERNAL: return "INTERNAL";
        case BRIDGE_ERR_ABI_MISMATCH: return "ABI_MISMATCH";
        default: return "UNKNOWN";
    }
}

class Error : public std::runtime_error {
public:
    Error(int32_t status, const std::string& message)
        : std::runtime_error(std::string("[") + status_name(status) + "] " + message), status_(status) {}
    int32_t status() const noexcept { return status_; }

private:
    int32_t status_;
};

inline void check(int32_t status) {
    if (status != BRIDGE_OK) {
        const char* msg = bridge_last_error();
        throw Error(status, msg ? msg : "");
    }
}

/// Throws `Error(BRIDGE_ERR_ABI_MISMATCH)` unless the loaded library's ABI version
/// (`bridge_abi_version()`) is the one of the header this program was compiled with.
inline void check_abi(uint32_t library_version = bridge_abi_version()) {
    if (library_version != static_cast<uint32_t>(BRIDGE_ABI_VERSION)) {
        throw Error(BRIDGE_ERR_ABI_MISMATCH,
                    "the loaded libdino_bridge has ABI version " + std::to_string(library_version) +
                        " (bridge_abi_version()), but this program was compiled against dino_bridge.h of ABI "
                        "version " +
                        std::to_string(BRIDGE_ABI_VERSION) +
                        " (BRIDGE_ABI_VERSION): rebuild it against the library's header, or load the "
                        "library it was built for");
    }
}

/// A view of `size` elements at `data`.
template <class T>
struct Span {
    T* data = nullptr;
    std::size_t size = 0;
    Span() = default;
    Span(T* d, std::size_t n) : data(d), size(n) {}
    template <class U, std::enable_if_t<std::is_convertible<U (*)[], T (*)[]>::value, int> = 0>
    Span(std::vector<U>& v) : data(v.data()), size(v.size()) {}
    template <class U, std::enable_if_t<std::is_convertible<const U (*)[], T (*)[]>::value, int> = 0>
    Span(const std::vector<U>& v) : data(v.data()), size(v.size()) {}
};

/// A token grid: rows x columns (tokens are row-major, `t = row * w + col`).
struct Grid {
    int32_t h = 0, w = 0;
    bool operator==(const Grid& o) const { return h == o.h && w == o.w; }
    bool operator!=(const Grid& o) const { return !(*this == o); }
};

/// (ABI 3) A DLPack descriptor of host memory (`kDLCPU`, compact row-major: no strides)
/// that holds its own shape, so that it can be built in place and passed wherever a
/// `const DLTensor&` is taken. It views the memory; nothing is copied or owned.
///
///   std::vector<float> lat(...); std::vector<uint16_t> out(...);
///   bridge.forward(Tensor(lat, {3, 4, 16, 16}), Tensor(out, {3, 16, 48}, DType::BF16));
class Tensor {
public:
    static constexpr int kMaxDims = 8;
    /// `shape` elements of `dtype` at `data`.
    Tensor(const void* data, std::initializer_list<int64_t> shape, DType dtype = DType::F32) {
        if (shape.size() > static_cast<std::size_t>(kMaxDims)) {
            throw Error(BRIDGE_ERR_INVALID_ARGUMENT, "Tensor: at most 8 dimensions");
        }
        int i = 0;
        for (int64_t d : shape) shape_[i++] = d;
        t_.data = const_cast<void*>(data);
        t_.device.device_type = static_cast<decltype(t_.device.device_type)>(DL_CPU);
        t_.device.device_id = 0;
        t_.ndim = i;
        t_.dtype.code = dtype == DType::BF16 ? 4 : 2;  // kDLBfloat, kDLFloat
        t_.dtype.bits = dtype == DType::F32 ? 32 : 16;
        t_.dtype.lanes = 1;
        t_.shape = shape_;
        t_.strides = nullptr;
        t_.byte_offset = 0;
    }
    /// A float32 vector, or a uint16_t one holding `DType::F16` / `DType::BF16` values.
    Tensor(const std::vector<float>& v, std::initializer_list<int64_t> shape) : Tensor(v.data(), shape) {}
    Tensor(const std::vector<uint16_t>& v, std::initializer_list<int64_t> shape, DType dtype)
        : Tensor(v.data(), shape, dtype) {}
    Tensor(const Tensor& o) : t_(o.t_) {
        for (int i = 0; i < kMaxDims; ++i) shape_[i] = o.shape_[i];
        t_.shape = shape_;
    }
    Tensor& operator=(const Tensor& o) {
        t_ = o.t_;
        for (int i = 0; i < kMaxDims; ++i) shape_[i] = o.shape_[i];
        t_.shape = shape_;
        return *this;
    }
    operator const DLTensor&() const noexcept { return t_; }
    const DLTensor& dl() const noexcept { return t_; }
    /// The descriptor, to change a field (`byte_offset`, `device`, `strides`, ...).
    DLTensor& dl() noexcept { return t_; }

private:
    int64_t shape_[kMaxDims] = {};
    DLTensor t_{};
};

/// (ABI 3) What the loaded library can do: ABI version, CUDA support and devices, buffer
/// and compute dtypes (bits `1 << BRIDGE_DTYPE_*`), the DLPack version, the largest side.
inline BridgeCapabilities capabilities() {
    BridgeCapabilities caps{};
    caps.struct_size = sizeof caps;
    check(bridge_get_capabilities(&caps));
    return caps;
}

/// (ABI 3) Sends the library's messages (`BRIDGE_LOG_*` levels) to `callback` with
/// `user_data`; `nullptr` stops them. Process-wide. The callback must be thread-safe, must
/// not call into the library, and must stay valid (with `user_data`) until replaced.
inline void set_log_callback(BridgeLogCallback callback, void* user_data = nullptr) {
    check(bridge_set_log_callback(callback, user_data));
}

/// Creation settings: the library's defaults, then change what you need. Every field of
/// the C struct is in `raw` (`raw.w_gram`, `raw.spatial_norm_gamma`, `raw.lr`, ...); the
/// setters below name the loss settings. Two losses: alignment's (`loss_backward`,
/// `latent_loss_backward`: REPA's cosine loss by default) and the bridge's own training
/// loss (`train_step`).
struct Params {
    BridgeParams raw{};
    Params() {
        check_abi();
        raw.struct_size = sizeof raw;
        check(bridge_params_default(&raw));
    }
    /// Load this checkpoint (.safetensors or .pt); empty = fresh weights from `raw`.
    std::string checkpoint;

    /// (ABI 4) Alignment's and the latent loss's weights: cosine, normalised MSE, raw MSE
    /// and the spatial-structure (Gram) term. The default is REPA's loss, (1, 0, 0, 0).
    Params& align_loss(float w_cos, float w_norm, float w_raw, float w_gram = 0.0f) {
        raw.align_w_cos = w_cos;
        raw.align_w_norm = w_norm;
        raw.align_w_raw = w_raw;
        raw.align_w_gram = w_gram;
        return *this;
    }
    /// The bridge's own training loss (`train_step`): the same terms, by default
    /// (1, 0.25, 0.05, 0).
    Params& train_loss(float w_cos, float w_norm, float w_raw, float w_gram = 0.0f) {
        raw.w_cos = w_cos;
        raw.w_norm = w_norm;
        raw.w_raw = w_raw;
        raw.w_gram = w_gram;
        return *this;
    }
    /// iREPA's spatial normalisation of the alignment target in `loss_backward`
    /// (gamma >= 0; 0 = off).
    Params& spatial_norm(float gamma) {
        raw.spatial_norm_gamma = gamma;
        return *this;
    }
};

class Bridge {
public:
    explicit Bridge(const Params& params) {
        check_abi();
        BridgeParams p = params.raw;
        p.checkpoint_path = params.checkpoint.empty() ? nullptr : params.checkpoint.c_str();
        check(bridge_create(&p, &handle_));
        info_ = read_info();
    }
    static Bridge open(const std::string& checkpoint, Params params = Params()) {
        params.checkpoint = checkpoint;
        return Bridge(params);
    }
    ~Bridge() {
        if (handle_) bridge_destroy(handle_);
    }
    Bridge(const Bridge&) = delete;
    Bridge& operator=(const Bridge&) = delete;
    Bridge(Bridge&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)), info_(other.info_) {}
    Bridge& operator=(Bridge&& other) noexcept {
        if (this != &other) {
            if (handle_) bridge_destroy(handle_);
            handle_ = std::exchange(other.handle_, nullptr);
            info_ = other.info_;
        }
        return *this;
    }

    explicit operator bool() const noexcept { return handle_ != nullptr; }
    BridgeHandle* handle() const noexcept { return handle_; }
    /// Config, parameter count, device, tokens and the current optimiser step.
    BridgeInfo info() const { return read_info(); }

    /// The stored latent side (`latent_size`) and token grid (`grid` x `grid`).
    int32_t latent_size() const noexcept { return info_.latent_size; }
    Grid grid() const noexcept { return {info_.grid, info_.grid}; }
    /// The token grid of `height x width` latents: `(height, width) / 2^adapter_depth`.
    /// Throws `Error(BRIDGE_ERR_SHAPE)` unless both sides are positive multiples of
    /// `2^adapter_depth` (the library also refuses sides above its limit).
    Grid token_grid(int32_t height, int32_t width) const {
        Grid g;
        if (!grid_of(height, width, g)) {
            throw Error(BRIDGE_ERR_SHAPE, "latent size " + std::to_string(height) + "x" + std::to_string(width) +
                                              ": sides must be positive multiples of " +
                                              std::to_string(multiple()) + " (2^adapter_depth)");
        }
        return g;
    }

    /// Elements of `batch` latents `[batch, in_ch, height, width]` (default: stored size).
    /// Throws `Error(BRIDGE_ERR_INVALID_ARGUMENT)` for a size that is not positive or overflows.
    std::size_t latent_elems(int64_t batch) const { return latent_elems(batch, latent_size(), latent_size()); }
    std::size_t latent_elems(int64_t batch, int32_t height, int32_t width) const {
        return elems({batch, info_.in_ch, height, width}, "latents");
    }
    /// Elements of `batch` token maps `[batch, h*w, target_dim]`: on the stored grid, a
    /// square `grid` x `grid` one, or `grid_h` x `grid_w`.
    std::size_t token_elems(int64_t batch) const { return token_elems(batch, grid()); }
    std::size_t token_elems(int64_t batch, int32_t grid) const { return token_elems(batch, Grid{grid, grid}); }
    std::size_t token_elems(int64_t batch, int32_t grid_h, int32_t grid_w) const {
        return token_elems(batch, Grid{grid_h, grid_w});
    }
    std::size_t token_elems(int64_t batch, Grid g) const {
        return elems({batch, g.h, g.w, info_.target_dim}, "tokens");
    }

    // ---- forward: latents [batch, in_ch, height, width] -> tokens [batch, h*w, target_dim]

    void forward(Span<const float> latents, Span<float> out, int64_t batch) const {
        forward(latents, out, batch, latent_size(), latent_size());
    }
    void forward(Span<const float> latents, Span<float> out, int64_t batch, int32_t height, int32_t width) const {
        expect_io(latents.size, out.size, batch, height, width, "out");
        check(bridge_forward(handle_, latents.data, out.data, batch, height, width, BRIDGE_DTYPE_F32));
    }
    void forward(Span<const uint16_t> latents, Span<uint16_t> out, int64_t batch, DType dtype) const {
        forward(latents, out, batch, latent_size(), latent_size(), dtype);
    }
    void forward(Span<const uint16_t> latents, Span<uint16_t> out, int64_t batch, int32_t height, int32_t width,
                 DType dtype) const {
        expect_io(latents.size, out.size, batch, height, width, "out");
        check(bridge_forward(handle_, latents.data, out.data, batch, height, width, static_cast<int32_t>(dtype)));
    }
    std::vector<float> forward(const std::vector<float>& latents, int64_t batch) const {
        return forward(latents, batch, latent_size(), latent_size());
    }
    std::vector<float> forward(const std::vector<float>& latents, int64_t batch, int32_t height,
                               int32_t width) const {
        std::vector<float> out(token_elems(batch, token_grid(height, width)));
        forward(Span<const float>(latents), Span<float>(out), batch, height, width);
        return out;
    }

    // ---- REPA alignment: returns the loss, writes d loss / d pred into `grad_pred`.

    /// Stored latent size; `pred` on the bridge's own grid.
    float loss_backward(Span<const float> pred, Span<const float> latents, Span<float> grad_pred, int64_t batch,
                        void* stream = nullptr) const {
        return loss_backward(pred, latents, grad_pred, batch, latent_size(), latent_size(), info_.grid,
                             info_.grid, stream);
    }
    /// Stored latent size; `pred` on a square `pred_grid` x `pred_grid` caller grid.
    float loss_backward(Span<const float> pred, Span<const float> latents, Span<float> grad_pred, int64_t batch,
                        int32_t pred_grid, void* stream = nullptr) const {
        return loss_backward(pred, latents, grad_pred, batch, latent_size(), latent_size(), pred_grid, pred_grid,
                             stream);
    }
    /// Latents `[batch, in_ch, height, width]`; `pred` `[batch, pred_h*pred_w, target_dim]`
    /// on the caller's grid: `token_grid(height, width)`, `k` times it (pred pooled) or
    /// `1/k` of it (target pooled).
    float loss_backward(Span<const float> pred, Span<const float> latents, Span<float> grad_pred, int64_t batch,
                        int32_t height, int32_t width, int32_t pred_h, int32_t pred_w,
                        void* stream = nullptr) const {
        std::size_t n;
        if (size_of({batch, pred_h, pred_w, info_.target_dim}, n)) {
            expect(pred.size, n, "pred");
            expect(grad_pred.size, n, "grad_pred");
        }
        expect_latents(latents.size, batch, height, width, "latents");
        float loss = 0;
        check(bridge_loss_backward(handle_, pred.data, latents.data, grad_pred.data, batch, height, width, pred_h,
                                   pred_w, BRIDGE_DTYPE_F32, &loss, stream));
        return loss;
    }

    // ---- Gradient through the frozen bridge to the latents.

    float latent_loss_backward(Span<const float> latents, Span<const float> target, Span<float> grad_latents,
                               int64_t batch, void* stream = nullptr) const {
        return latent_loss_backward(latents, target, grad_latents, batch, latent_size(), latent_size(), stream);
    }
    /// `target` `[batch, h*w, target_dim]` on `token_grid(height, width)`.
    float latent_loss_backward(Span<const float> latents, Span<const float> target, Span<float> grad_latents,
                               int64_t batch, int32_t height, int32_t width, void* stream = nullptr) const {
        expect_latents(latents.size, batch, height, width, "latents");
        expect_latents(grad_latents.size, batch, height, width, "grad_latents");
        expect_tokens(target.size, batch, height, width, "target");
        float loss = 0;
        check(bridge_latent_loss_backward(handle_, latents.data, target.data, grad_latents.data, batch, height,
                                          width, BRIDGE_DTYPE_F32, &loss, stream));
        return loss;
    }

    // ---- One AdamW step on the bridge's own weights.

    BridgeStepStats train_step(Span<const float> latents, Span<const float> targets, int64_t batch,
                               void* stream = nullptr) {
        return train_step(latents, targets, batch, latent_size(), latent_size(), stream);
    }
    BridgeStepStats train_step(Span<const float> latents, Span<const float> targets, int64_t batch, int32_t height,
                               int32_t width, void* stream = nullptr) {
        expect_latents(latents.size, batch, height, width, "latents");
        expect_tokens(targets.size, batch, height, width, "targets");
        BridgeStepStats stats{};
        stats.struct_size = sizeof stats;
        check(bridge_train_step(handle_, latents.data, targets.data, batch, height, width, BRIDGE_DTYPE_F32, &stats,
                                stream));
        return stats;
    }

    // ---- (ABI 3) The same on DLPack descriptors: shapes, dtypes (each tensor its own),
    // strides and devices are read from them and checked by the library (host memory for a
    // CPU bridge, the bridge's GPU for a CUDA one, ordered on `stream`).

    /// latents `[B, in_ch, H, W]` -> out `[B, h*w, target_dim]`.
    void forward(const DLTensor& latents, const DLTensor& out, void* stream = nullptr) const {
        check(bridge_forward_dlpack(handle_, &latents, &out, stream));
    }
    /// `pred` `[B, T, target_dim]` (its grid inferred from `T`) or `[B, pred_h, pred_w,
    /// target_dim]`; `grad_pred` of `pred`'s shape; the loss is written to `loss` (one
    /// element, on the host or the bridge's GPU).
    void loss_backward(const DLTensor& pred, const DLTensor& latents, const DLTensor& grad_pred, const DLTensor& loss,
                       void* stream = nullptr) const {
        check(bridge_loss_backward_dlpack(handle_, &pred, &latents, &grad_pred, &loss, stream));
    }
    /// `target` `[B, h*w, target_dim]`; `grad_latents` of `latents`' shape; `loss` as above.
    void latent_loss_backward(const DLTensor& latents, const DLTensor& target, const DLTensor& grad_latents,
                              const DLTensor& loss, void* stream = nullptr) const {
        check(bridge_latent_loss_backward_dlpack(handle_, &latents, &target, &grad_latents, &loss, stream));
    }
    BridgeStepStats train_step(const DLTensor& latents, const DLTensor& targets, void* stream = nullptr) {
        BridgeStepStats stats{};
        stats.struct_size = sizeof stats;
        check(bridge_train_step_dlpack(handle_, &latents, &targets, &stats, stream));
        return stats;
    }

    // ---- (ABI 5) The flat parameter vector: training in the host's own stack.

    /// One tensor of the flat vector.
    struct ParamInfo {
        std::string name;  ///< the checkpoint key
        int64_t offset = 0, numel = 0;
        std::vector<int64_t> shape;
        bool decays = false;  ///< whether the library's AdamW applies weight decay to it
    };
    /// The flat vector's length.
    int64_t param_count() const {
        int64_t n = 0;
        check(bridge_param_count(handle_, &n));
        return n;
    }
    /// The flat vector's tensors, in order.
    std::vector<ParamInfo> param_info() const {
        std::vector<ParamInfo> out;
        const int64_t total = param_count();
        for (int64_t i = 0; out.empty() || out.back().offset + out.back().numel < total; ++i) {
            BridgeParamInfo p{};
            p.struct_size = sizeof p;
            check(bridge_param_info(handle_, i, &p));
            out.push_back(ParamInfo{p.name, p.offset, p.numel, std::vector<int64_t>(p.shape, p.shape + p.ndim),
                                    p.decays != 0});
        }
        return out;
    }
    /// The weights into `flat` (float32 `[param_count()]`, where the bridge lives).
    void get_params(const DLTensor& flat, void* stream = nullptr) const {
        check(bridge_get_params_dlpack(handle_, &flat, stream));
    }
    /// A CPU bridge's weights as a vector.
    std::vector<float> get_params() const {
        std::vector<float> flat(static_cast<std::size_t>(param_count()));
        get_params(Tensor(flat, {static_cast<int64_t>(flat.size())}));
        return flat;
    }
    /// Every weight from `flat` (float32 `[param_count()]`); moments and step untouched.
    void set_params(const DLTensor& flat, void* stream = nullptr) {
        check(bridge_set_params_dlpack(handle_, &flat, stream));
    }
    void set_params(const std::vector<float>& flat) {
        set_params(Tensor(flat, {static_cast<int64_t>(flat.size())}));
    }
    /// The training loss of a training-mode forward (dropout masks from `seed`) into
    /// `loss` (one element), its gradient into `grad_params` (float32 `[param_count()]`)
    /// and, unless `grad_latents` is null, into the latents' gradient. Nothing is updated.
    void loss_grads(const DLTensor& latents, const DLTensor& targets, const DLTensor& grad_params,
                    const DLTensor* grad_latents, const DLTensor& loss, uint64_t seed, void* stream = nullptr) const {
        check(bridge_loss_grads_dlpack(handle_, &latents, &targets, &grad_params, grad_latents, &loss, seed, stream));
    }
    /// Tokens in training mode, dropout masks from `seed`.
    void forward_train(const DLTensor& latents, const DLTensor& out, uint64_t seed, void* stream = nullptr) const {
        check(bridge_forward_train_dlpack(handle_, &latents, &out, seed, stream));
    }
    /// d sum(forward_train(latents, seed) * grad_out) / d params (and / d latents).
    void vjp(const DLTensor& latents, const DLTensor& grad_out, const DLTensor& grad_params,
             const DLTensor* grad_latents, uint64_t seed, void* stream = nullptr) const {
        check(bridge_vjp_dlpack(handle_, &latents, &grad_out, &grad_params, grad_latents, seed, stream));
    }
    /// One step of the handle's AdamW with the gradient `grad_params` (a non-finite norm
    /// skips it; `stats.loss` is 0).
    BridgeStepStats apply_grads(const DLTensor& grad_params, void* stream = nullptr) {
        BridgeStepStats stats{};
        stats.struct_size = sizeof stats;
        check(bridge_apply_grads_dlpack(handle_, &grad_params, &stats, stream));
        return stats;
    }
    BridgeStepStats apply_grads(const std::vector<float>& grad_params) {
        return apply_grads(Tensor(grad_params, {static_cast<int64_t>(grad_params.size())}));
    }

    void save(const std::string& path) const { check(bridge_save(handle_, path.c_str())); }

private:
    BridgeInfo read_info() const {
        BridgeInfo info{};
        info.struct_size = sizeof info;
        check(bridge_get_info(handle_, &info));
        return info;
    }
    int32_t multiple() const noexcept { return int32_t{1} << info_.adapter_depth; }
    bool grid_of(int32_t height, int32_t width, Grid& g) const noexcept {
        const int32_t m = multiple();
        if (height <= 0 || width <= 0 || height % m != 0 || width % m != 0) return false;
        g = Grid{height / m, width / m};
        return true;
    }
    /// `n` = the product of `factors`; false when one is not positive or it overflows.
    static bool size_of(std::initializer_list<int64_t> factors, std::size_t& n) {
        constexpr std::size_t top = std::numeric_limits<std::size_t>::max();
        n = 1;
        for (int64_t f : factors) {
            if (f <= 0) return false;
            const auto u = static_cast<std::size_t>(f);
            if (n > top / u) return false;
            n *= u;
        }
        return true;
    }
    static std::size_t elems(std::initializer_list<int64_t> factors, const char* what) {
        std::size_t n;
        if (!size_of(factors, n)) {
            std::string dims;
            for (int64_t f : factors) dims += (dims.empty() ? "" : ", ") + std::to_string(f);
            throw Error(BRIDGE_ERR_INVALID_ARGUMENT,
                        std::string(what) + " [" + dims + "]: sizes must be positive and fit in memory");
        }
        return n;
    }
    // Buffer-size checks. A call whose latent size or batch the library refuses anyway
    // (sides that are no positive multiple of 2^adapter_depth, a batch <= 0, a size that
    // overflows) is passed through unchecked, so that its status and message are the
    // library's (SHAPE or INVALID_ARGUMENT), given before it reads any buffer.
    void expect_latents(std::size_t got, int64_t batch, int32_t height, int32_t width, const char* name) const {
        Grid g;
        std::size_t n;
        if (grid_of(height, width, g) && size_of({batch, info_.in_ch, height, width}, n)) expect(got, n, name);
    }
    void expect_tokens(std::size_t got, int64_t batch, int32_t height, int32_t width, const char* name) const {
        Grid g;
        std::size_t n;
        if (grid_of(height, width, g) && size_of({batch, g.h, g.w, info_.target_dim}, n)) expect(got, n, name);
    }
    void expect_io(std::size_t latents, std::size_t out, int64_t batch, int32_t height, int32_t width,
                   const char* out_name) const {
        expect_latents(latents, batch, height, width, "latents");
        expect_tokens(out, batch, height, width, out_name);
    }
    static void expect(std::size_t got, std::size_t want, const char* name) {
        if (got != want) {
            throw Error(BRIDGE_ERR_INVALID_ARGUMENT, std::string(name) + " holds " + std::to_string(got) +
                                                         " elements; the call needs " + std::to_string(want));
        }
    }

    BridgeHandle* handle_ = nullptr;
    BridgeInfo info_{};
};

}  // namespace dino_bridge
