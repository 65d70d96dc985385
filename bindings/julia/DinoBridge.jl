"""
    DinoBridge

Julia bindings for dino-bridge: DINOv2-base patch tokens from SD VAE latents, as a REPA
alignment target. The shared library is `ENV["DINO_BRIDGE_LIB"]` (default
`libdino_bridge.so` on the loader path).

    using .DinoBridge
    b = DinoBridge.Bridge("bridge.safetensors")
    tokens = DinoBridge.forward(b, latents)           # latents: Array{Float32,4}
    loss, grad = DinoBridge.loss_backward(b, pred, latents)
    close(b)                                          # or leave it to the finalizer

Arrays are row-major on the C side: a Julia `Array{Float32,4}` of size (L, L, C, B) is
the C buffer [B, C, L, L]; tokens come back as (D, T, B). With CUDA.jl loaded, `CuArray`
inputs go through `bridge_forward_cuda_ptr` on the current CUDA stream.
"""
module DinoBridge

const LIB = get(ENV, "DINO_BRIDGE_LIB", "libdino_bridge.so")

const BRIDGE_OK = Int32(0)
const STATUS_NAMES = Dict{Int32,String}(1 => "INVALID_ARGUMENT", 2 => "SHAPE", 3 => "IO", 4 => "CHECKPOINT",
    5 => "UNSUPPORTED", 6 => "DEVICE", 7 => "NON_FINITE", 8 => "INTERNAL", 9 => "ABI_MISMATCH")
const DTYPE_F32 = Int32(0)

# Mirrors of the C structs (field order and types as in dino_bridge.h).
mutable struct BridgeParams
    struct_size::UInt32
    checkpoint_path::Ptr{UInt8}
    device::Int32
    compute_dtype::Int32
    seed::UInt64
    in_ch::Int32
    latent_size::Int32
    grid::Int32
    target_dim::Int32
    adapter_mid_channels::Int32
    adapter_out_channels::Int32
    adapter_depth::Int32
    width::Int32
    depth::Int32
    heads::Int32
    mlp_ratio::Float32
    dropout::Float32
    latent_shift::Float32
    latent_scale::Float32
    w_cos::Float32
    w_norm::Float32
    w_raw::Float32
    lr::Float32
    weight_decay::Float32
    beta1::Float32
    beta2::Float32
    eps::Float32
    grad_clip::Float32
    warmup_steps::Int64
    total_steps::Int64
end

mutable struct BridgeInfo
    struct_size::UInt32
    in_ch::Int32
    latent_size::Int32
    grid::Int32
    target_dim::Int32
    adapter_mid_channels::Int32
    adapter_out_channels::Int32
    adapter_depth::Int32
    width::Int32
    depth::Int32
    heads::Int32
    mlp_ratio::Float32
    dropout::Float32
    latent_shift::Float32
    latent_scale::Float32
    param_count::Int64
    device::Int32
    tokens::Int32
    step::Int64
end

mutable struct BridgeStepStats
    struct_size::UInt32
    loss::Float32
    grad_norm::Float32
    lr::Float32
    step::Int64
    skipped::Int32
end

zeroed(::Type{T}) where {T} = T((zero(fieldtype(T, i)) for i in 1:fieldcount(T))...)

struct BridgeError <: Exception
    status::Int32
    message::String
end
Base.showerror(io::IO, e::BridgeError) =
    print(io, "BridgeError[", get(STATUS_NAMES, e.status, "UNKNOWN"), "]: ", e.message)

function check(status::Int32)
    if status != BRIDGE_OK
        msg = unsafe_string(ccall((:bridge_last_error, LIB), Cstring, ()))
        throw(BridgeError(status, msg))
    end
    nothing
end

abi_version() = ccall((:bridge_abi_version, LIB), UInt32, ())

mutable struct Bridge
    handle::Ptr{Cvoid}
    info::BridgeInfo
end

"""
    Bridge(checkpoint=nothing; settings...)

Load a checkpoint (`.safetensors` or `.pt`), or make fresh weights when `checkpoint` is
`nothing`; keyword arguments set `BridgeParams` fields (e.g. `lr=1e-3`, `device=0`).
"""
function Bridge(checkpoint::Union{Nothing,AbstractString}=nothing; settings...)
    params = zeroed(BridgeParams)
    params.struct_size = UInt32(sizeof(BridgeParams))
    check(ccall((:bridge_params_default, LIB), Int32, (Ref{BridgeParams},), params))
    for (k, v) in settings
        setfield!(params, k, convert(fieldtype(BridgeParams, k), v))
    end
    handle = Ref{Ptr{Cvoid}}(C_NULL)
    path = checkpoint === nothing ? nothing : String(checkpoint)
    GC.@preserve path begin
        params.checkpoint_path = path === nothing ? Ptr{UInt8}(C_NULL) : pointer(path)
        check(ccall((:bridge_create, LIB), Int32, (Ref{BridgeParams}, Ref{Ptr{Cvoid}}), params, handle))
    end
    b = Bridge(handle[], zeroed(BridgeInfo))
    finalizer(close, b)
    b.info = info(b)
    b
end

function Base.close(b::Bridge)
    if b.handle != C_NULL
        h, b.handle = b.handle, C_NULL
        check(ccall((:bridge_destroy, LIB), Int32, (Ptr{Cvoid},), h))
    end
    nothing
end

handle(b::Bridge) = b.handle == C_NULL ? throw(ArgumentError("this Bridge is closed")) : b.handle

function info(b::Bridge)
    i = zeroed(BridgeInfo)
    i.struct_size = UInt32(sizeof(BridgeInfo))
    check(ccall((:bridge_get_info, LIB), Int32, (Ptr{Cvoid}, Ref{BridgeInfo}), handle(b), i))
    i
end

latent_dims(b::Bridge, batch) = (Int(b.info.latent_size), Int(b.info.latent_size), Int(b.info.in_ch), batch)
token_dims(b::Bridge, batch, grid=b.info.grid) = (Int(b.info.target_dim), Int(grid)^2, batch)

function expect(x::AbstractArray, want, name)
    size(x) == want || throw(DimensionMismatch("$name has size $(size(x)); expected $want"))
end

"""Predicted DINOv2 tokens, size (target_dim, tokens, B), for latents of size (L, L, C, B)."""
function forward(b::Bridge, latents::Array{Float32,4})
    batch = size(latents, 4)
    expect(latents, latent_dims(b, batch), "latents")
    out = Array{Float32}(undef, token_dims(b, batch))
    check(ccall((:bridge_forward, LIB), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32),
        handle(b), latents, out, batch, DTYPE_F32))
    out
end

# Any other array: a CuArray (CUDA.jl loaded) goes through its device pointer on the
# current CUDA stream; anything else is copied to an Array{Float32,4} first.
function forward(b::Bridge, latents::AbstractArray{<:Real,4})
    if nameof(typeof(latents)) == :CuArray && isdefined(Main, :CUDA)
        cuda = getfield(Main, :CUDA)
        batch = size(latents, 4)
        eltype(latents) == Float32 || throw(ArgumentError("CuArray latents must be Float32"))
        expect(latents, latent_dims(b, batch), "latents")
        out = similar(latents, token_dims(b, batch))
        devptr(x) = Ptr{Cvoid}(UInt(pointer(x)))
        forward_cuda_ptr(b, devptr(latents), devptr(out), batch, Ptr{Cvoid}(UInt(cuda.stream().handle)))
        return out
    end
    forward(b, Array{Float32,4}(latents))
end

"""Device-pointer forward for CuArrays (called by the CUDA.jl glue): `stream` is a CUstream."""
function forward_cuda_ptr(b::Bridge, latents::Ptr{Cvoid}, out::Ptr{Cvoid}, batch::Integer, stream::Ptr{Cvoid})
    check(ccall((:bridge_forward_cuda_ptr, LIB), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Ptr{Cvoid}),
        handle(b), latents, out, batch, DTYPE_F32, stream))
end

"""REPA alignment: `(loss, grad_pred)` for `pred` of size (D, g*g, B), g a multiple of the grid."""
function loss_backward(b::Bridge, pred::Array{Float32,3}, latents::Array{Float32,4}; stream::Ptr{Cvoid}=C_NULL)
    batch = size(latents, 4)
    expect(latents, latent_dims(b, batch), "latents")
    g = isqrt(size(pred, 2))
    expect(pred, token_dims(b, batch, g), "pred")
    grad = similar(pred)
    loss = Ref{Float32}(0)
    check(ccall((:bridge_loss_backward, LIB), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Int32, Ref{Float32}, Ptr{Cvoid}),
        handle(b), pred, latents, grad, batch, g, DTYPE_F32, loss, stream))
    loss[], grad
end

"""`(loss, grad_latents)` of the loss between bridge(latents) and `target`, through the frozen bridge."""
function latent_loss_backward(b::Bridge, latents::Array{Float32,4}, target::Array{Float32,3}; stream::Ptr{Cvoid}=C_NULL)
    batch = size(latents, 4)
    expect(latents, latent_dims(b, batch), "latents")
    expect(target, token_dims(b, batch), "target")
    grad = similar(latents)
    loss = Ref{Float32}(0)
    check(ccall((:bridge_latent_loss_backward, LIB), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Ref{Float32}, Ptr{Cvoid}),
        handle(b), latents, target, grad, batch, DTYPE_F32, loss, stream))
    loss[], grad
end

"""One AdamW step on the bridge's own weights; returns the step statistics."""
function train_step!(b::Bridge, latents::Array{Float32,4}, targets::Array{Float32,3}; stream::Ptr{Cvoid}=C_NULL)
    batch = size(latents, 4)
    expect(latents, latent_dims(b, batch), "latents")
    expect(targets, token_dims(b, batch), "targets")
    stats = zeroed(BridgeStepStats)
    stats.struct_size = UInt32(sizeof(BridgeStepStats))
    check(ccall((:bridge_train_step, LIB), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Ref{BridgeStepStats}, Ptr{Cvoid}),
        handle(b), latents, targets, batch, DTYPE_F32, stats, stream))
    stats
end

"""Atomic checkpoint write."""
save(b::Bridge, path::AbstractString) =
    check(ccall((:bridge_save, LIB), Int32, (Ptr{Cvoid}, Cstring), handle(b), path))

end # module
