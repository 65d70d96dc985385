# REPA-style alignment from Julia: predicted DINOv2 tokens for latents (square and
# rectangular), and the loss and gradient for a projector's output on a token grid twice
# as fine as the bridge's (pooled to it by the library) and on the bridge's own grid.
#
#   cargo build --release
#   julia examples/align.jl [bridge.safetensors]
#
# The package finds the checkout's target/release/libdino_bridge.so by itself
# (DINO_BRIDGE_LIB=/path/to/libdino_bridge.so names another). Without a checkpoint the
# bridge is a fresh one on the `repa` grid (16x16 tokens from 32x32 latents).
push!(LOAD_PATH, joinpath(@__DIR__, "..", "bindings", "julia"))   # the DinoBridge package
using DinoBridge

bridge = length(ARGS) > 0 ? DinoBridge.Bridge(ARGS[1]) : DinoBridge.Bridge(; adapter_depth=1, grid=16)
info = bridge.info
batch = 2
m = DinoBridge.multiple(bridge)                                                     # 2^adapter_depth
for (H, W) in ((info.latent_size, info.latent_size), (3m * 4, 5m * 4))              # square, then 3:5
    latents = randn(Float32, W, H, info.in_ch, batch)                               # C order [B, C, H, W]
    h, w = DinoBridge.token_grid(bridge, H, W)
    tokens = DinoBridge.forward(bridge, latents)                                    # (D, h*w, B)
    println("latents $(H)x$(W): tokens ", size(tokens), " on a $(h)x$(w) grid")

    pred = randn(Float32, info.target_dim, (2h) * (2w), batch)                      # a projector's output
    loss, grad = DinoBridge.loss_backward(bridge, pred, latents)                    # grid (2h, 2w) inferred
    println("  alignment at $(2h)x$(2w) (pooled 2x2): loss $loss, gradient ", size(grad))
    same = randn(Float32, info.target_dim, h * w, batch)
    loss, _ = DinoBridge.loss_backward(bridge, same, latents; grid=(h, w))
    println("  alignment at $(h)x$(w): loss $loss")
end
close(bridge)
