"""``segfast bench``: run the benchmark suites, or compare two result files (parser: cli/main.py)."""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    import torch

    from segfast import bench

    if args.action:
        if len(args.action) != 3 or args.action[0] != "compare":
            raise ValueError(f"expected 'segfast bench compare A.json B.json', got {' '.join(args.action)!r}")
        for path in args.action[1:]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"no result file {path}")
        print(bench.report.compare(Path(args.action[1]), Path(args.action[2])))
        return 0
    suites = [s for s in args.suite.split(",") if s]
    unknown = [s for s in suites if s not in bench.SUITES]
    if unknown or not suites:
        raise ValueError(f"--suite: expected some of {', '.join(bench.SUITES)}, got {args.suite!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here")
    if args.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {args.reps}")
    only = _only(args.only, suites, bench.SUITES)
    suites = [s for s in suites if s in only] if only else suites
    settings = bench.Settings(
        device=args.device, dtype=args.dtype, layout=args.layout, quick=args.quick, compile=not args.no_compile
    )
    rows, env = bench.run(suites, settings, args.reps, only)
    if not rows:
        raise ValueError("nothing ran: every case's baseline failed with these settings")
    stem = f"bench-{args.device}-{args.dtype}-{args.layout}" + ("-quick" if args.quick else "")
    json_path = args.out / f"{stem}.json"
    bench.report.write_json(json_path, rows, env)
    print(f"\n{bench.report.environment_line(env)}\n\n{bench.report.markdown(rows)}\n\nwrote {json_path}")
    if not args.no_charts:
        for path in bench.report.charts(rows, args.out, stem):
            print(f"wrote {path}")
    return 0


def _only(spec: str, suites: list[str], known: dict) -> dict[str, list[str]]:
    """--only names, each sent to the suite that knows it (suites left without a name do not run)."""
    names = {
        "ops": list(known["ops"].FAMILIES),
        "models": ["unet", "unet_iabn", "fcn", "resnet18_unet"],
        "augment": ["bytes", "int64", "uint8"],
        "overhead": known["overhead"].NAMES,
    }
    only: dict[str, list[str]] = {}
    for name in filter(None, spec.split(",")):
        owners = [s for s in suites if name in names[s]]
        if not owners:
            raise ValueError(
                f"--only: {name!r} is in none of the suites {', '.join(suites)} "
                f"(known: {', '.join(n for s in suites for n in names[s])})"
            )
        only.setdefault(owners[0], []).append(name)
    return only
