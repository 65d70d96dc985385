// dino_bridge.hpp: header-only C++17 wrapper over the dino-bridge C API.
//
//   dino_bridge::Bridge bridge = dino_bridge::Bridge::open("bridge.safetensors");
//   std::vector<float> tokens(bridge.token_elems(batch));
//   bridge.forward(latents, tokens, batch);          // sizes checked, errors thrown
//
// - `Bridge` owns one handle (move-only; the destructor frees it).
// - Every failure throws `dino_bridge::Error` carrying the C status and the library's
//   message; size mismatches throw it with BRIDGE_ERR_INVALID_ARGUMENT before any call.
// - Buffers are views (`Span<T>`: pointer + element count, from a std::vector or raw
//   memory); nothing is copied or retained. `float` means BRIDGE_DTYPE_F32; pass
//   `Span<const uint16_t>` plus `DType::F16` / `DType::BF16` for half-precision data.
// - Thread-safety is the C API's: forward and loss calls may run concurrently on one
//   Bridge; train_step excludes them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "dino_bridge.h"

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

/// A view of `size` elements at `data`.
template <class T>
struct Span {
    T* data = nullptr;
    std::size_t size = 0;
    Span() = default;
    Span(T* d, std::size_t n) : data(d), size(n) {}
    template <class U>
    Span(std::vector<U>& v) : data(v.data()), size(v.size()) {}
    template <class U>
    Span(const std::vector<U>& v) : data(v.data()), size(v.size()) {}
};

/// Creation settings: the library's defaults, then change what you need.
struct Params {
    BridgeParams raw{};
    Params() {
        raw.struct_size = sizeof raw;
        check(bridge_params_default(&raw));
    }
    /// Load this checkpoint (.safetensors or .pt); empty = fresh weights from `raw`.
    std::string checkpoint;
};

class Bridge {
public:
    explicit Bridge(const Params& params) {
        BridgeParams p = params.raw;
        p.checkpoint_path = params.checkpoint.empty() ? nullptr : params.checkpoint.c_str();
        check(bridge_create(&p, &handle_));
        info_ = read_info();
    }
    static Bridge open(const std::string& checkpoint) {
        Params p;
        p.checkpoint = checkpoint;
        return Bridge(p);
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

    std::size_t latent_elems(int64_t batch) const {
        return static_cast<std::size_t>(batch) * info_.in_ch * info_.latent_size * info_.latent_size;
    }
    /// Elements of `batch` token maps on a `grid` x `grid` grid (0: the bridge's grid).
    std::size_t token_elems(int64_t batch, int32_t grid = 0) const {
        std::size_t g = static_cast<std::size_t>(grid ? grid : info_.grid);
        return static_cast<std::size_t>(batch) * g * g * info_.target_dim;
    }

    void forward(Span<const float> latents, Span<float> out, int64_t batch) const {
        expect(latents.size, latent_elems(batch), "latents");
        expect(out.size, token_elems(batch), "out");
        check(bridge_forward(handle_, latents.data, out.data, batch, BRIDGE_DTYPE_F32));
    }
    void forward(Span<const uint16_t> latents, Span<uint16_t> out, int64_t batch, DType dtype) const {
        expect(latents.size, latent_elems(batch), "latents");
        expect(out.size, token_elems(batch), "out");
        check(bridge_forward(handle_, latents.data, out.data, batch, static_cast<int32_t>(dtype)));
    }
    std::vector<float> forward(const std::vector<float>& latents, int64_t batch) const {
        std::vector<float> out(token_elems(batch));
        forward(Span<const float>(latents), Span<float>(out), batch);
        return out;
    }

    /// REPA alignment: returns the loss, writes d loss / d pred into `grad_pred`.
    float loss_backward(Span<const float> pred, Span<const float> latents, Span<float> grad_pred, int64_t batch,
                        int32_t pred_grid, void* stream = nullptr) const {
        expect(pred.size, token_elems(batch, pred_grid), "pred");
        expect(grad_pred.size, token_elems(batch, pred_grid), "grad_pred");
        expect(latents.size, latent_elems(batch), "latents");
        float loss = 0;
        check(bridge_loss_backward(handle_, pred.data, latents.data, grad_pred.data, batch, pred_grid,
                                   BRIDGE_DTYPE_F32, &loss, stream));
        return loss;
    }

    /// Gradient through the frozen bridge to the latents.
    float latent_loss_backward(Span<const float> latents, Span<const float> target, Span<float> grad_latents,
                               int64_t batch, void* stream = nullptr) const {
        expect(latents.size, latent_elems(batch), "latents");
        expect(grad_latents.size, latent_elems(batch), "grad_latents");
        expect(target.size, token_elems(batch), "target");
        float loss = 0;
        check(bridge_latent_loss_backward(handle_, latents.data, target.data, grad_latents.data, batch,
                                          BRIDGE_DTYPE_F32, &loss, stream));
        return loss;
    }

    BridgeStepStats train_step(Span<const float> latents, Span<const float> targets, int64_t batch,
                               void* stream = nullptr) {
        expect(latents.size, latent_elems(batch), "latents");
        expect(targets.size, token_elems(batch), "targets");
        BridgeStepStats stats{};
        stats.struct_size = sizeof stats;
        check(bridge_train_step(handle_, latents.data, targets.data, batch, BRIDGE_DTYPE_F32, &stats, stream));
        return stats;
    }

    void save(const std::string& path) const { check(bridge_save(handle_, path.c_str())); }

private:
    BridgeInfo read_info() const {
        BridgeInfo info{};
        info.struct_size = sizeof info;
        check(bridge_get_info(handle_, &info));
        return info;
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
