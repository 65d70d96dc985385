# REPA-style alignment from Julia: predicted DINOv2 tokens for latents, and the loss and
# gradient for a projector's output on a 16x16 token grid.
#
#   cargo build --release
#   DINO_BRIDGE_LIB=target/release/libdino_bridge.so julia examples/align.jl bridge.safetensors
include(joinpath(@__DIR__, "..", "bindings", "julia", "DinoBridge.jl"))
using .DinoBridge

bridge = DinoBridge.Bridge(length(ARGS) > 0 ? ARGS[1] : nothing)
info = bridge.info
batch = 2
latents = randn(Float32, info.latent_size, info.latent_size, info.in_ch, batch)   # C order [B, C, L, L]
tokens = DinoBridge.forward(bridge, latents)                                        # (D, 64, B)
println("tokens: ", size(tokens))

g = 2 * info.grid
pred = randn(Float32, info.target_dim, g * g, batch)                                # a projector's output
loss, grad = DinoBridge.loss_backward(bridge, pred, latents)
println("alignment loss $loss, gradient ", size(grad))
close(bridge)
