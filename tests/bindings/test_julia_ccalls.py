"""Julia cannot be installed here, so the Julia bindings are checked against the header:
every `ccall` names a function of `include/dino_bridge.h` with the right number and C
types of arguments and the right return type, every function of the header has one,
every mirrored struct has the header's fields in the header's order with matching types
(ABI 2's `w_gram`, `spatial_norm_gamma` and ABI 3's capabilities and DLPack descriptors included), the module declares the header's
ABI version and checks it before creating a bridge, and examples/align.jl only calls
what the module defines. The bindings are a package: bindings/julia/Project.toml names
DinoBridge (uuid, version, no dependencies outside the standard library), the module is
src/DinoBridge.jl, every `ccall` goes to the library that `library_path()` finds at run
time (DINO_BRIDGE_LIB first), and examples/align.jl loads the package with `using`."""

import re
import uuid
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "bindings" / "julia"
HEADER = (ROOT / "include" / "dino_bridge.h").read_text()
JULIA = (PACKAGE / "src" / "DinoBridge.jl").read_text()
EXAMPLE = (ROOT / "examples" / "align.jl").read_text()
# The uuids of the standard libraries a dependency may name (Julia's own, fixed).
STDLIB_UUIDS = {"Libdl": "8f399da3-3557-5675-b5ff-fb832c97cbdb"}


def project_toml() -> dict:
    text = (PACKAGE / "Project.toml").read_text()
    if tomllib is not None:
        return tomllib.loads(text)
    # Project.toml's plain subset: `key = "value"` lines, top level and in [sections]
    project, table = {}, None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.fullmatch(r"\[(\w+)\]", line):
            table = project.setdefault(m.group(1), {})
        elif m := re.fullmatch(r'(\w+)\s*=\s*"([^"]*)"', line):
            (project if table is None else table)[m.group(1)] = m.group(2)
    return project


def canon_c(t: str) -> str:
    t = re.sub(r"\b(const|struct)\b", " ", t)
    return re.sub(r"\s+", "", t)


def c_functions() -> dict:
    funcs = {}
    for ret, name, args in re.findall(r"^([\w ][\w *]*?)(bridge_\w+)\((.*?)\);$", HEADER, re.M):
        types = []
        if args.strip() != "void":
            for a in args.split(","):
                a = a.strip()
                m = re.match(r"(.*?)(\w+)$", a)
                types.append(canon_c(m.group(1)))
        funcs[name] = (canon_c(ret), types)
    return funcs


SCALARS = {"Int32": "int32_t", "Int64": "int64_t", "UInt32": "uint32_t", "UInt64": "uint64_t", "Float32": "float",
           "Cstring": "char*", "Cint": "int32_t", "UInt8": "uint8_t", "UInt16": "uint16_t", "Ptr{Int64}": "int64_t*"}


def julia_to_c(t: str) -> set:
    t = t.strip()
    if t in SCALARS:
        return {SCALARS[t]}
    if t == "Ptr{Cvoid}":
        return {"void*", "BridgeHandle*", "BridgeLogCallback"}
    if t in ("DLTensor", "DLDevice", "DLDataType"):
        return {t}
    if t == "Ptr{DLTensor}":  # a descriptor that may be NULL
        return {"DLTensor*"}
    if t == "Ptr{UInt8}":
        return {"char*"}
    m = re.fullmatch(r"Ref\{(.+)\}", t)
    if m:
        return {x + "*" for x in julia_to_c(m.group(1))} | ({m.group(1) + "*"} if m.group(1).startswith("Bridge") else set())
    if t.startswith("Bridge"):
        return {t}
    raise AssertionError(f"unmapped Julia type {t}")


def julia_ccalls():
    pattern = r"ccall\(\(:(\w+),\s*library_path\(\)\),\s*([\w{}]+),\s*\(([^)]*)\)"
    return re.findall(pattern, JULIA, re.S)


def test_every_ccall_matches_a_header_function():
    funcs = c_functions()
    calls = julia_ccalls()
    assert len(funcs) == 26, sorted(funcs)
    assert {name for name, _, _ in calls} == set(funcs), "functions without a Julia wrapper or unknown to the header"
    for name, ret, args in calls:
        c_ret, c_args = funcs[name]
        jl_args = [a for a in (x.strip() for x in args.split(",")) if a]
        assert len(jl_args) == len(c_args), f"{name}: {len(jl_args)} Julia arguments, {len(c_args)} in C"
        for i, (j, c) in enumerate(zip(jl_args, c_args)):
            assert c in julia_to_c(j), f"{name} argument {i}: Julia {j} does not pass C {c}"
        assert c_ret in julia_to_c(ret), f"{name}: returns {c_ret} in C, Julia says {ret}"


def assert_fields_match(struct: str, c_body: str, jl_body: str):
    """The Julia mirror has the C struct's fields, in order, with passing types (a C array
    `T name[N]` as `NTuple{N,T}`)."""
    c_fields = [(m.group(2), canon_c(m.group(1)), m.group(3))
                for m in re.finditer(r"^\s*([\w][\w *]*?)(\w+)(?:\[(\w+)\])?;", c_body, re.M)]
    jl_fields = re.findall(r"^\s*(\w+)::([\w{},]+)", jl_body, re.M)
    assert [n for n, _ in jl_fields] == [n for n, _, _ in c_fields], struct
    for (name, jt), (_, ct, length) in zip(jl_fields, c_fields):
        if length is not None:
            n = int(length) if length.isdigit() else int(re.search(r"#define %s (\d+)" % length, HEADER).group(1))
            m = re.fullmatch(r"NTuple\{(\d+),(\w+)\}", jt)
            assert m and int(m.group(1)) == n, f"{struct}.{name}: C [{length}] = {n}, Julia {jt}"
            jt = m.group(2)
            ct = {"char": "uint8_t"}.get(ct, ct)  # char bytes as UInt8
        assert ct in julia_to_c(jt), f"{struct}.{name}: C {ct}, Julia {jt}"


def test_mirrored_structs_match_the_header():
    for struct in ("BridgeParams", "BridgeInfo", "BridgeStepStats", "BridgeCapabilities", "BridgeParamInfo"):
        body = re.search(r"typedef struct %s \{(.*?)\} %s;" % (struct, struct), HEADER, re.S).group(1)
        jl_body = re.search(r"mutable struct %s\n(.*?)\nend" % struct, JULIA, re.S).group(1)
        assert_fields_match(struct, body, jl_body)


def test_the_abi_2_fields_and_arguments_are_mirrored():
    params = re.search(r"mutable struct BridgeParams\n(.*?)\nend", JULIA, re.S).group(1)
    fields = re.findall(r"^\s*(\w+)::([\w{}]+)", params, re.M)
    assert fields[-6:-4] == [("w_gram", "Float32"), ("spatial_norm_gamma", "Float32")]
    # ABI 4: alignment's own weights after them.
    assert fields[-4:] == [(f"align_w_{t}", "Float32") for t in ("cos", "norm", "raw", "gram")]
    calls = {name: [a.strip() for a in args.split(",") if a.strip()] for name, _, args in julia_ccalls()}
    funcs = c_functions()
    # height and width after batch in every compute call; pred_h, pred_w after them.
    for name in ("bridge_forward", "bridge_forward_cuda_ptr", "bridge_loss_backward", "bridge_latent_loss_backward",
                 "bridge_train_step"):
        i = funcs[name][1].index("int64_t")
        assert funcs[name][1][i + 1:i + 3] == ["int32_t", "int32_t"], name
        assert calls[name][i:i + 3] == ["Int64", "Int32", "Int32"], name
    assert calls["bridge_loss_backward"][5:10] == ["Int32"] * 5


def test_the_module_declares_and_checks_the_headers_abi_version():
    header = int(re.search(r"#define BRIDGE_ABI_VERSION (\d+)", HEADER).group(1))
    assert header == 5
    declared = re.search(r"^const ABI_VERSION = UInt32\((\d+)\)$", JULIA, re.M)
    assert declared and int(declared.group(1)) == header
    check = re.search(r"^function check_abi\(\)\n(.*?)^end$", JULIA, re.S | re.M).group(1)
    assert "abi_version()" in check and "ABI_VERSION" in check and "error(" in check
    constructor = re.search(r"^function Bridge\(checkpoint.*?\n(.*?)^end$", JULIA, re.S | re.M).group(1)
    first = constructor.strip().splitlines()[0].strip()
    assert first == "check_abi()", f"Bridge(...) must check the ABI before any other call, starts with {first!r}"


def test_the_dlpack_mirrors_match_the_headers_declarations():
    for struct in ("DLDevice", "DLDataType", "DLTensor"):
        body = re.search(r"typedef struct \{([^}]*)\} %s;" % struct, HEADER, re.S).group(1)
        jl_body = re.search(r"^struct %s\n(.*?)\nend" % struct, JULIA, re.S | re.M).group(1)
        assert_fields_match(struct, body, jl_body)


def test_the_example_calls_only_what_the_module_defines():
    defined = set(re.findall(r"^(?:function\s+)?(\w+)(?:\(|\{)", JULIA, re.M))
    used = set(re.findall(r"DinoBridge\.(\w+)\(", EXAMPLE))
    assert used and used <= defined, used - defined
    for name, kw in re.findall(r"DinoBridge\.(\w+)\([^;)]*;\s*(\w+)=", EXAMPLE):
        sig = re.search(r"^function %s\((.*?)\)$" % name, JULIA, re.S | re.M)
        assert sig, name
        if "settings..." in sig.group(1):  # Bridge(...; settings...): BridgeParams fields
            params = re.search(r"mutable struct BridgeParams\n(.*?)\nend", JULIA, re.S).group(1)
            assert re.search(r"^\s*%s::" % kw, params, re.M), f"BridgeParams has no field {kw}"
        else:
            assert re.search(r"\b%s(::|=)" % kw, sig.group(1)), f"{name} has no keyword {kw}"


def test_the_bindings_are_a_package():
    project = project_toml()
    assert project.get("name") == "DinoBridge"
    assert str(uuid.UUID(project["uuid"])) == project["uuid"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.get("version", "")), project.get("version")
    deps = project.get("deps", {})
    assert {name: STDLIB_UUIDS.get(name) for name in deps} == deps, f"dependencies outside the standard library: {deps}"
    # the module is where Julia's code loading looks for it: src/<name>.jl, module <name>
    assert (PACKAGE / "src" / "DinoBridge.jl").is_file()
    assert not (PACKAGE / "DinoBridge.jl").exists(), "the module moved to src/DinoBridge.jl"
    assert re.search(r"^module DinoBridge$", JULIA, re.M)
    assert re.search(r"^end # module$", JULIA, re.M)
    # whatever the code (past the docstring) loads is Base, Core or a declared dependency
    code = JULIA[re.search(r"^module DinoBridge$", JULIA, re.M).end():]
    loaded = set(re.findall(r"^\s*(?:using|import)\s+(\w+)", code, re.M))
    assert loaded <= set(deps) | {"Base", "Core"}, loaded - set(deps)


def test_every_ccall_goes_to_the_library_found_at_run_time():
    assert JULIA.count("ccall(") == len(julia_ccalls()) == 26, "a ccall that does not go through library_path()"
    # nothing fixes the library when the package is precompiled
    assert not re.search(r"^const LIB\b", JULIA, re.M)
    body = re.search(r"^function find_library\(\)\n(.*?)^end$", JULIA, re.S | re.M).group(1)
    env = body.index('get(ENV, "DINO_BRIDGE_LIB"')
    deps = body.index('"deps"')
    target = body.index('"target", "release"')
    assert env < deps < target, "DINO_BRIDGE_LIB first, then deps/, then the checkout's target/release"
    library_path = re.search(r"^function library_path\(\)\n(.*?)^end$", JULIA, re.S | re.M).group(1)
    assert "find_library()" in library_path and "LIB_PATH[]" in library_path
    init = re.search(r"^__init__\(\) = (.*)$", JULIA, re.M)
    assert init and 'LIB_PATH[] = ""' in init.group(1), "each session finds the library again"
    # the ABI error names the library it checked
    check = re.search(r"^function check_abi\(\)\n(.*?)^end$", JULIA, re.S | re.M).group(1)
    assert "$(library_path())" in check


def test_the_example_loads_the_package():
    assert "include(" not in EXAMPLE, "examples/align.jl should load the package, not include its file"
    push = re.search(r"^push!\(LOAD_PATH, joinpath\(@__DIR__, (.*?)\)\)", EXAMPLE, re.M)
    assert push, "examples/align.jl puts the package on the LOAD_PATH"
    parts = [p.strip().strip('"') for p in push.group(1).split(",")]
    assert (ROOT / "examples").joinpath(*parts).resolve() == PACKAGE.resolve()
    using = re.search(r"^using DinoBridge$", EXAMPLE, re.M)
    assert using and push.start() < using.start()
    assert "using .DinoBridge" not in EXAMPLE
