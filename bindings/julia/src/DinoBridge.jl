"""
    DinoBridge

Julia bindings for dino-bridge: DINOv2-base patch tokens from SD VAE latents, as a REPA
alignment target. A package (`bindings/julia`): put that directory on the `LOAD_PATH` (or
`] dev path/to/bindings/julia`) and `using DinoBridge`. The shared library is
`library_path()`: `ENV["DINO_BRIDGE_LIB"]`, else `deps/libdino_bridge.so` in the package,
else the checkout's `target/release/libdino_bridge.so` (`cargo build --release`), else
`libdino_bridge.so` on the loader path.

    push!(LOAD_PATH, "path/to/dino-bridge/bindings/julia")
    using DinoBridge
    b = DinoBridge.Bridge("bridge.safetensors")       # or Bridge(; adapter_depth=1, grid=16) (`repa`)
    tokens = DinoBridge.forward(b, latents)           # latents: Array{Float32,4}
    loss, grad = DinoBridge.loss_backward(b, pred, latents)               # caller grid inferred
    loss, grad = DinoBridge.loss_backward(b, pred, latents; grid=(16, 16)) # or given as (ph, pw)
    close(b)                                          # or leave it to the finalizer

Arrays are row-major on the C side: a Julia `Array{Float32,4}` of size (W, H, C, B) is
the C buffer [B, C, H, W]; tokens come back as (D, h*w, B) on the token grid
`(h, w) = (H, W) .÷ 2^adapter_depth` (token `t = row*w + col`, row-major as in C). `H` and
`W` may be any positive multiples of `2^adapter_depth`. With CUDA.jl loaded, `CuArray`
inputs go through `bridge_forward_cuda_ptr` on the current CUDA stream.

The library must speak `ABI_VERSION` (the header's `BRIDGE_ABI_VERSION`): the first
`Bridge` checks `bridge_abi_version()` and refuses another (`check_abi()`).
"""
module DinoBridge

# The library's file name as cargo writes it on this platform.
const LIBNAME = Sys.iswindows() ? "dino_bridge.dll" : "libdino_bridge." * (Sys.isapple() ? "dylib" : "so")

# Found at the first call of a session, not when the package is precompiled: a path (or an
# ENV value) frozen into the precompile cache would outlive a change of DINO_BRIDGE_LIB.
const LIB_PATH = Ref("")

"""
    library_path()

The shared library every call goes to, decided once per session at its first use:
`ENV["DINO_BRIDGE_LIB"]` when set; else `deps/libdino_bridge.so` in this package (copy or
link a built library there); else `target/release/libdino_bridge.so` of the checkout the
package sits in (`bindings/julia` is two levels below its root); else the bare file name,
for the system's loader path (`LD_LIBRARY_PATH`)."""
function library_path()
    isempty(LIB_PATH[]) || return LIB_PATH[]
    LIB_PATH[] = find_library()
end

function find_library()
    env = get(ENV, "DINO_BRIDGE_LIB", "")
    isempty(env) || return env
    root = something(pkgdir(@__MODULE__), dirname(@__DIR__))   # the package's directory
    for candidate in (joinpath(root, "deps", LIBNAME), joinpath(root, "..", "..", "target", "release", LIBNAME))
        isfile(candidate) && return normpath(candidate)
    end
    LIBNAME
end

__init__() = (LIB_PATH[] = ""; nothing)

# The header's BRIDGE_ABI_VERSION these declarations were written for.
const ABI_VERSION = UInt32(5)

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
    # ABI 2
    w_gram::Float32
    spatial_norm_gamma::Float32
    # ABI 4: alignment's and the latent loss's weights (REPA's loss by default)
    align_w_cos::Float32
    align_w_norm::Float32
    align_w_raw::Float32
    align_w_gram::Float32
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

# ABI 5: one tensor of the flat parameter vector (`name` NUL-terminated in 96 bytes)
mutable struct BridgeParamInfo
    struct_size::UInt32
    name::NTuple{96,UInt8}
    offset::Int64
    numel::Int64
    ndim::Int32
    shape::NTuple{4,Int64}
    decays::Int32
end

# ABI 3
mutable struct BridgeCapabilities
    struct_size::UInt32
    abi_version::UInt32
    cuda::Int32
    cuda_devices::Int32
    buffer_dtypes::UInt32
    compute_dtypes::UInt32
    dlpack_major::Int32
    dlpack_minor::Int32
    max_latent_side::Int32
    # ABI 4: what the CPU kernels multiply with, and why (a static string)
    blas::Ptr{UInt8}
end

# DLPack 1.x descriptors, as the header declares them (immutable: passed by reference).
struct DLDevice
    device_type::Int32   # 1 = CPU, 2 = CUDA
    device_id::Int32
end
struct DLDataType
    code::UInt8          # 2 = float
    bits::UInt8
    lanes::UInt16
end
struct DLTensor
    data::Ptr{Cvoid}
    device::DLDevice
    ndim::Int32
    dtype::DLDataType
    shape::Ptr{Int64}
    strides::Ptr{Int64}  # C_NULL: compact row-major
    byte_offset::UInt64
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
        msg = unsafe_string(ccall((:bridge_last_error, library_path()), Cstring, ()))
        throw(BridgeError(status, msg))
    end
    nothing
end

abi_version() = ccall((:bridge_abi_version, library_path()), UInt32, ())

const ABI_CHECKED = Ref(false)

"""
    check_abi()

Compares the library's `bridge_abi_version()` with `ABI_VERSION` (once per session) and
throws an `ErrorException` naming both when they differ: the structs and calls here only
fit that version."""
function check_abi()
    ABI_CHECKED[] && return nothing
    v = abi_version()
    v == ABI_VERSION || error("$(library_path()) has ABI version $(Int(v)), but DinoBridge.jl was written for ABI version " *
                              "$(Int(ABI_VERSION)): build the library from the same checkout (cargo build --release " *
                              "--lib) and point DINO_BRIDGE_LIB at it")
    ABI_CHECKED[] = true
    nothing
end

mutable struct Bridge
    handle::Ptr{Cvoid}
    info::BridgeInfo
end

"""
    Bridge(checkpoint=nothing; settings...)

Load a checkpoint (`.safetensors` or `.pt`), or make fresh weights when `checkpoint` is
`nothing`; keyword arguments set `BridgeParams` fields: config fields for fresh weights
(e.g. `adapter_depth=1, grid=16` for the `repa` grid), and settings for any bridge (`lr=1e-3`,
`device=0`, `spatial_norm_gamma=0.6`). Two losses: alignment's and the latent loss's
(`align_w_cos`, `align_w_norm`, `align_w_raw`, `align_w_gram`: REPA's cosine loss by
default, ABI 4) and the bridge's own training loss (`w_cos`, `w_norm`, `w_raw`, `w_gram`).
"""
function Bridge(checkpoint::Union{Nothing,AbstractString}=nothing; settings...)
    check_abi()
    params = zeroed(BridgeParams)
    params.struct_size = UInt32(sizeof(BridgeParams))
    check(ccall((:bridge_params_default, library_path()), Int32, (Ref{BridgeParams},), params))
    for (k, v) in settings
        setfield!(params, k, convert(fieldtype(BridgeParams, k), v))
    end
    handle = Ref{Ptr{Cvoid}}(C_NULL)
    path = checkpoint === nothing ? nothing : String(checkpoint)
    GC.@preserve path begin
        params.checkpoint_path = path === nothing ? Ptr{UInt8}(C_NULL) : pointer(path)
        check(ccall((:bridge_create, library_path()), Int32, (Ref{BridgeParams}, Ref{Ptr{Cvoid}}), params, handle))
    end
    b = Bridge(handle[], zeroed(BridgeInfo))
    finalizer(close, b)
    b.info = info(b)
    b
end

function Base.close(b::Bridge)
    if b.handle != C_NULL
        h, b.handle = b.handle, C_NULL
        check(ccall((:bridge_destroy, library_path()), Int32, (Ptr{Cvoid},), h))
    end
    nothing
end

handle(b::Bridge) = b.handle == C_NULL ? throw(ArgumentError("this Bridge is closed")) : b.handle

function info(b::Bridge)
    i = zeroed(BridgeInfo)
    i.struct_size = UInt32(sizeof(BridgeInfo))
    check(ccall((:bridge_get_info, library_path()), Int32, (Ptr{Cvoid}, Ref{BridgeInfo}), handle(b), i))
    i
end

"""Latent sides must be positive multiples of this (`2^adapter_depth`)."""
multiple(b::Bridge) = 1 << Int(b.info.adapter_depth)

"""The token grid `(h, w)` of latents of height `H` and width `W` (C's `[B, C, H, W]`)."""
function token_grid(b::Bridge, height::Integer, width::Integer)
    m = multiple(b)
    (height >= 1 && width >= 1 && height % m == 0 && width % m == 0) || throw(DimensionMismatch(
        "latents: sides $(height)x$(width) (H x W) must be positive multiples of $m (2^adapter_depth) for this bridge"))
    (height ÷ m, width ÷ m)
end

"""`(batch, H, W, (h, w))` of latents of Julia size (W, H, C, B), checked."""
function latent_shape(b::Bridge, latents::AbstractArray, name="latents")
    ndims(latents) == 4 && size(latents, 3) == b.info.in_ch ||
        throw(DimensionMismatch("$name has size $(size(latents)); expected (W, H, $(b.info.in_ch), B)"))
    width, height, _, batch = size(latents)
    batch >= 1 || throw(DimensionMismatch("$name has an empty batch"))
    batch, height, width, token_grid(b, height, width)
end

token_dims(b::Bridge, batch, grid::Tuple{Integer,Integer}) = (Int(b.info.target_dim), Int(grid[1] * grid[2]), batch)

function expect(x::AbstractArray, want, name)
    size(x) == want || throw(DimensionMismatch("$name has size $(size(x)); expected $want"))
end

"""How the library meets a caller grid `(ph, pw)` with the bridge's `(h, w)`: `:same`,
`:pool_pred` (the caller's is `k` times it), `:pool_target` (`1/k` of it), or `nothing`."""
function grid_match(caller, bridge)
    (ph, pw), (h, w) = caller, bridge
    (ph <= 0 || pw <= 0) && return nothing
    (ph, pw) == (h, w) && return :same
    (ph % h == 0 && pw % w == 0 && ph ÷ h == pw ÷ w) && return :pool_pred
    (h % ph == 0 && w % pw == 0 && h ÷ ph == w ÷ pw) && return :pool_target
    nothing
end

"""The caller grid `(ph, pw)` with `ph * pw == tokens` that the library accepts for the
bridge grid `(h, w)`; an `ArgumentError` when none fits (or, defensively, several do)."""
function infer_caller_grid(tokens::Integer, bridge::Tuple{Integer,Integer})
    found = Tuple{Int,Int}[]
    for ph in 1:isqrt(max(tokens, 0)), cand in ((ph, tokens ÷ ph), (tokens ÷ ph, ph))
        tokens % ph == 0 && grid_match(cand, bridge) !== nothing && !(cand in found) && push!(found, cand)
    end
    length(found) == 1 && return found[1]
    h, w = bridge
    isempty(found) && throw(ArgumentError("pred: $tokens tokens fit no caller grid for the bridge's token grid " *
        "$(h)x$(w): it must equal it or be k times it or 1/k of it on both sides, e.g. $(h*w) ($(h)x$(w)) or " *
        "$(4h*w) ($(2h)x$(2w)) tokens"))
    throw(ArgumentError("pred: $tokens tokens fit more than one caller grid for the bridge's token grid " *
        "$(h)x$(w) ($(join(["$(a)x$(c)" for (a, c) in sort(found)], ", "))): pass grid=(ph, pw)"))
end

"""Predicted DINOv2 tokens, size (target_dim, h*w, B), for latents of size (W, H, C, B)."""
function forward(b::Bridge, latents::Array{Float32,4})
    batch, height, width, grid = latent_shape(b, latents)
    out = Array{Float32}(undef, token_dims(b, batch, grid))
    check(ccall((:bridge_forward, library_path()), Int32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Int32, Int32),
        handle(b), latents, out, batch, height, width, DTYPE_F32))
    out
end

# Any other array: a CuArray (CUDA.jl loaded) goes through its device pointer on the
# current CUDA stream; anything else is copied to an Array{Float32,4} first.
function forward(b::Bridge, latents::AbstractArray{<:Real,4})
    if nameof(typeof(latents)) == :CuArray && isdefined(Main, :CUDA)
        cuda = getfield(Main, :CUDA)
        eltype(latents) == Float32 || throw(ArgumentError("CuArray latents must be Float32"))
        batch, height, width, grid = latent_shape(b, latents)
        out = similar(latents, token_dims(b, batch, grid))
        devptr(x) = Ptr{Cvoid}(UInt(pointer(x)))
        forward_cuda_ptr(b, devptr(latents), devptr(out), batch, height, width,
            Ptr{Cvoid}(UInt(cuda.stream().handle)))
        return out
    end
    forward(b, Array{Float32,4}(latents))
end

"""Device-pointer forward for CuArrays (called by the CUDA.jl glue): latents C `[batch, C,
height, width]`, `stream` a CUstream."""
function forward_cuda_ptr(b::Bridge, latents::Ptr{Cvoid}, out::Ptr{Cvoid}, batch::Integer, height::Integer,
                          width::Integer, stream::Ptr{Cvoid})
    check(ccall((:bridge_forward_cuda_ptr, library_path()), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Int32, Int32, Ptr{Cvoid}),
        handle(b), latents, out, batch, height, width, DTYPE_F32, stream))
end

"""
    loss_backward(b, pred, latents; grid=nothing, stream=C_NULL) -> (loss, grad_pred)

REPA alignment: `pred` of size (D, ph*pw, B) is the caller's projection on its token grid
`grid = (ph, pw)` (row-major, as in C), which must equal the bridge's grid `(h, w)` for
these latents, or be `k` times it (pred pooled) or `1/k` of it (target pooled). Without
`grid` it is inferred from the token count (e.g. 240 tokens on a 6x10 grid are 12x20).
"""
function loss_backward(b::Bridge, pred::Array{Float32,3}, latents::Array{Float32,4};
                       grid::Union{Nothing,Tuple{Integer,Integer}}=nothing, stream::Ptr{Cvoid}=C_NULL)
    batch, height, width, bgrid = latent_shape(b, latents)
    if grid === nothing
        grid = infer_caller_grid(size(pred, 2), bgrid)
    elseif grid_match(grid, bgrid) === nothing
        throw(ArgumentError("grid=$grid: the caller grid must equal the bridge's token grid $(bgrid[1])x$(bgrid[2]) " *
                            "for these latents, or be k times it or 1/k of it with the same k on both sides"))
    end
    expect(pred, token_dims(b, batch, grid), "pred")
    grad = similar(pred)
    loss = Ref{Float32}(0)
    check(ccall((:bridge_loss_backward, library_path()), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Int32, Int32, Int32, Int32, Ref{Float32},
         Ptr{Cvoid}),
        handle(b), pred, latents, grad, batch, height, width, grid[1], grid[2], DTYPE_F32, loss, stream))
    loss[], grad
end

"""`(loss, grad_latents)` of the loss between bridge(latents) and `target` (D, h*w, B), through the frozen bridge."""
function latent_loss_backward(b::Bridge, latents::Array{Float32,4}, target::Array{Float32,3}; stream::Ptr{Cvoid}=C_NULL)
    batch, height, width, grid = latent_shape(b, latents)
    expect(target, token_dims(b, batch, grid), "target")
    grad = similar(latents)
    loss = Ref{Float32}(0)
    check(ccall((:bridge_latent_loss_backward, library_path()), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Int32, Int32, Ref{Float32}, Ptr{Cvoid}),
        handle(b), latents, target, grad, batch, height, width, DTYPE_F32, loss, stream))
    loss[], grad
end

"""One AdamW step on the bridge's own weights (targets (D, h*w, B)); returns the step statistics."""
function train_step!(b::Bridge, latents::Array{Float32,4}, targets::Array{Float32,3}; stream::Ptr{Cvoid}=C_NULL)
    batch, height, width, grid = latent_shape(b, latents)
    expect(targets, token_dims(b, batch, grid), "targets")
    stats = zeroed(BridgeStepStats)
    stats.struct_size = UInt32(sizeof(BridgeStepStats))
    check(ccall((:bridge_train_step, library_path()), Int32,
        (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Cvoid}, Int64, Int32, Int32, Int32, Ref{BridgeStepStats}, Ptr{Cvoid}),
        handle(b), latents, targets, batch, height, width, DTYPE_F32, stats, stream))
    stats
end

# ---- ABI 3: DLPack descriptors (each array its own element type), capabilities, logs ----

dl_dtype(::Type{Float32}) = DLDataType(2, 32, 1)
dl_dtype(::Type{Float16}) = DLDataType(2, 16, 1)

"""A host `DLTensor` over a Julia `Array` (the C shape is Julia's size reversed).
`shape` must outlive the call (`GC.@preserve` it with `x`)."""
dltensor(x::Array{T}, shape::Vector{Int64}) where {T<:Union{Float32,Float16}} =
    DLTensor(Ptr{Cvoid}(pointer(x)), DLDevice(1, 0), Int32(length(shape)), dl_dtype(T), pointer(shape),
             Ptr{Int64}(C_NULL), UInt64(0))

c_shape(x::AbstractArray) = Int64[reverse(size(x))...]

"""
    forward_dlpack(b, latents; out_type=Float32)

`forward` through `bridge_forward_dlpack`: `latents` may be `Float32` or `Float16`, the
output another of them (each buffer its own type)."""
function forward_dlpack(b::Bridge, latents::Array{T,4}; out_type::Type=Float32) where {T<:Union{Float32,Float16}}
    batch, _, _, grid = latent_shape(b, latents)
    out = Array{out_type}(undef, token_dims(b, batch, grid))
    ls, os = c_shape(latents), c_shape(out)
    GC.@preserve latents out ls os begin
        check(ccall((:bridge_forward_dlpack, library_path()), Int32,
            (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, Ptr{Cvoid}),
            handle(b), dltensor(latents, ls), dltensor(out, os), C_NULL))
    end
    out
end

"""`loss_backward` through `bridge_loss_backward_dlpack` (the caller grid inferred by the library)."""
function loss_backward_dlpack(b::Bridge, pred::Array{P,3}, latents::Array{T,4}) where {P<:Union{Float32,Float16},
                                                                                      T<:Union{Float32,Float16}}
    grad, loss = similar(pred), zeros(Float32, 1)
    ps, ls, gs, ss = c_shape(pred), c_shape(latents), c_shape(grad), Int64[1]
    GC.@preserve pred latents grad loss ps ls gs ss begin
        check(ccall((:bridge_loss_backward_dlpack, library_path()), Int32,
            (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, Ref{DLTensor}, Ref{DLTensor}, Ptr{Cvoid}),
            handle(b), dltensor(pred, ps), dltensor(latents, ls), dltensor(grad, gs), dltensor(loss, ss), C_NULL))
    end
    loss[1], grad
end

"""`latent_loss_backward` through `bridge_latent_loss_backward_dlpack`."""
function latent_loss_backward_dlpack(b::Bridge, latents::Array{T,4}, target::Array{Float32,3}) where {T<:Union{Float32,Float16}}
    grad, loss = similar(latents), zeros(Float32, 1)
    ls, ts, gs, ss = c_shape(latents), c_shape(target), c_shape(grad), Int64[1]
    GC.@preserve latents target grad loss ls ts gs ss begin
        check(ccall((:bridge_latent_loss_backward_dlpack, library_path()), Int32,
            (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, Ref{DLTensor}, Ref{DLTensor}, Ptr{Cvoid}),
            handle(b), dltensor(latents, ls), dltensor(target, ts), dltensor(grad, gs), dltensor(loss, ss), C_NULL))
    end
    loss[1], grad
end

"""`train_step!` through `bridge_train_step_dlpack`."""
function train_step_dlpack!(b::Bridge, latents::Array{T,4}, targets::Array{Float32,3}) where {T<:Union{Float32,Float16}}
    stats = zeroed(BridgeStepStats)
    stats.struct_size = UInt32(sizeof(BridgeStepStats))
    ls, ts = c_shape(latents), c_shape(targets)
    GC.@preserve latents targets ls ts begin
        check(ccall((:bridge_train_step_dlpack, library_path()), Int32,
            (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, Ref{BridgeStepStats}, Ptr{Cvoid}),
            handle(b), dltensor(latents, ls), dltensor(targets, ts), stats, C_NULL))
    end
    stats
end

"""What this build of the library can do (ABI, CUDA and devices, dtypes, DLPack version)."""
function capabilities()
    c = zeroed(BridgeCapabilities)
    c.struct_size = UInt32(sizeof(BridgeCapabilities))
    check(ccall((:bridge_get_capabilities, library_path()), Int32, (Ref{BridgeCapabilities},), c))
    c
end

const LOG_HANDLER = Ref{Any}(nothing)

function log_trampoline(level::Int32, message::Cstring, ::Ptr{Cvoid})::Cvoid
    f = LOG_HANDLER[]
    f === nothing || f(Int(level), unsafe_string(message))
    nothing
end

"""
    set_log_callback(f)

Sends the library's messages to `f(level, message)` (`level` 1 debug .. 4 error), or
nowhere for `f = nothing`. The library calls it on the thread of the call that logs."""
function set_log_callback(f)
    LOG_HANDLER[] = f
    cb = f === nothing ? C_NULL : @cfunction(log_trampoline, Cvoid, (Int32, Cstring, Ptr{Cvoid}))
    check(ccall((:bridge_set_log_callback, library_path()), Int32, (Ptr{Cvoid}, Ptr{Cvoid}), cb, C_NULL))
end

# ---- ABI 5: the flat parameter vector, for training in the host's own stack ----
#
# The bridge as a differentiable function of one Float32 vector (every model tensor in
# order, each row-major as in C): its gradient, a training-mode forward and its VJP (one
# seed, one set of dropout masks), and one step of the handle's AdamW with a gradient the
# host gives (e.g. after its own all-reduce).

"""The flat parameter vector's length."""
function param_count(b::Bridge)
    n = Ref{Int64}(0)
    check(ccall((:bridge_param_count, library_path()), Int32, (Ptr{Cvoid}, Ref{Int64}), handle(b), n))
    n[]
end

"""The flat vector's tensors, in order: `(name, offset, numel, shape, decays)` (`shape` in
C's row-major order; `offset` 0-based)."""
function param_info(b::Bridge)
    out, total = NamedTuple[], param_count(b)
    i = 0
    while isempty(out) || out[end].offset + out[end].numel < total
        p = zeroed(BridgeParamInfo)
        p.struct_size = UInt32(sizeof(BridgeParamInfo))
        check(ccall((:bridge_param_info, library_path()), Int32, (Ptr{Cvoid}, Int64, Ref{BridgeParamInfo}),
            handle(b), i, p))
        bytes = collect(p.name)
        name = String(bytes[1:findfirst(==(0x00), bytes)-1])
        push!(out, (name=name, offset=p.offset, numel=p.numel, shape=collect(p.shape[1:p.ndim]),
                    decays=p.decays != 0))
        i += 1
    end
    out
end

"""A descriptor that may be NULL: a pointer to `r`, or NULL for `nothing`."""
ptr_or_null(r) = r === nothing ? Ptr{DLTensor}(C_NULL) : Base.unsafe_convert(Ptr{DLTensor}, r)

"""The weights as the flat vector."""
function get_params(b::Bridge)
    flat = Vector{Float32}(undef, param_count(b))
    fs = Int64[length(flat)]
    GC.@preserve flat fs begin
        check(ccall((:bridge_get_params_dlpack, library_path()), Int32, (Ptr{Cvoid}, Ref{DLTensor}, Ptr{Cvoid}),
            handle(b), dltensor(flat, fs), C_NULL))
    end
    flat
end

"""Replaces every weight from the flat vector (optimiser moments and step untouched)."""
function set_params!(b::Bridge, flat::Vector{Float32})
    fs = Int64[length(flat)]
    GC.@preserve flat fs begin
        check(ccall((:bridge_set_params_dlpack, library_path()), Int32, (Ptr{Cvoid}, Ref{DLTensor}, Ptr{Cvoid}),
            handle(b), dltensor(flat, fs), C_NULL))
    end
    nothing
end

"""
    loss_grads(b, latents, targets; seed=0, want_latents=false)

The training loss of a training-mode forward (dropout masks from `seed`) and its gradient:
`(loss, grad_params, grad_latents)` (`grad_latents` is `nothing` unless asked for)."""
function loss_grads(b::Bridge, latents::Array{Float32,4}, targets::Array{Float32,3}; seed::Integer=0,
                    want_latents::Bool=false)
    grad, loss = Vector{Float32}(undef, param_count(b)), zeros(Float32, 1)
    gl = want_latents ? similar(latents) : nothing
    ls, ts, gs, ss = c_shape(latents), c_shape(targets), Int64[length(grad)], Int64[1]
    gls = gl === nothing ? Int64[] : c_shape(gl)
    GC.@preserve latents targets grad loss gl ls ts gs ss gls begin
        glt = gl === nothing ? nothing : Ref(dltensor(gl, gls))
        GC.@preserve glt begin
            check(ccall((:bridge_loss_grads_dlpack, library_path()), Int32,
                (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, Ref{DLTensor}, Ptr{DLTensor}, Ref{DLTensor}, UInt64, Ptr{Cvoid}),
                handle(b), dltensor(latents, ls), dltensor(targets, ts), dltensor(grad, gs),
                ptr_or_null(glt),
                dltensor(loss, ss), UInt64(seed), C_NULL))
        end
    end
    loss[1], grad, gl
end

"""Tokens in training mode, dropout masks from `seed`."""
function forward_train(b::Bridge, latents::Array{Float32,4}; seed::Integer=0)
    batch, _, _, grid = latent_shape(b, latents)
    out = Array{Float32}(undef, token_dims(b, batch, grid))
    ls, os = c_shape(latents), c_shape(out)
    GC.@preserve latents out ls os begin
        check(ccall((:bridge_forward_train_dlpack, library_path()), Int32,
            (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, UInt64, Ptr{Cvoid}),
            handle(b), dltensor(latents, ls), dltensor(out, os), UInt64(seed), C_NULL))
    end
    out
end

"""The vector-Jacobian product of `forward_train(b, latents; seed)` with `grad_out`:
`(grad_params, grad_latents)` (`grad_latents` is `nothing` unless asked for)."""
function vjp(b::Bridge, latents::Array{Float32,4}, grad_out::Array{Float32,3}; seed::Integer=0,
             want_latents::Bool=false)
    grad = Vector{Float32}(undef, param_count(b))
    gl = want_latents ? similar(latents) : nothing
    ls, os, gs = c_shape(latents), c_shape(grad_out), Int64[length(grad)]
    gls = gl === nothing ? Int64[] : c_shape(gl)
    GC.@preserve latents grad_out grad gl ls os gs gls begin
        glt = gl === nothing ? nothing : Ref(dltensor(gl, gls))
        GC.@preserve glt begin
            check(ccall((:bridge_vjp_dlpack, library_path()), Int32,
                (Ptr{Cvoid}, Ref{DLTensor}, Ref{DLTensor}, Ref{DLTensor}, Ptr{DLTensor}, UInt64, Ptr{Cvoid}),
                handle(b), dltensor(latents, ls), dltensor(grad_out, os), dltensor(grad, gs),
                ptr_or_null(glt),
                UInt64(seed), C_NULL))
        end
    end
    grad, gl
end

"""One step of the handle's AdamW with the flat gradient `grad` (a non-finite norm skips it)."""
function apply_grads!(b::Bridge, grad::Vector{Float32})
    stats = zeroed(BridgeStepStats)
    stats.struct_size = UInt32(sizeof(BridgeStepStats))
    gs = Int64[length(grad)]
    GC.@preserve grad gs begin
        check(ccall((:bridge_apply_grads_dlpack, library_path()), Int32,
            (Ptr{Cvoid}, Ref{DLTensor}, Ref{BridgeStepStats}, Ptr{Cvoid}),
            handle(b), dltensor(grad, gs), stats, C_NULL))
    end
    stats
end

"""Atomic checkpoint write."""
save(b::Bridge, path::AbstractString) =
    check(ccall((:bridge_save, library_path()), Int32, (Ptr{Cvoid}, Cstring), handle(b), path))

end # module
