"""CPU benchmarks. Run each entry point from the repository root as a module:

    python -m benchmarks.bench_pretrain --out outputs/bench/pretrain.json
    python -m benchmarks.bench_upstream --out outputs/bench/upstream.json

``bench_pretrain`` puts together the student training step (:mod:`.student_step`), the CLAP
teacher (:mod:`.teacher`) and the data pipeline (:mod:`.data_pipeline`), measured with the
shared FLOP counting (:mod:`.flops`), ``torch.mm`` reference (:mod:`.matmul`), profiler
summary (:mod:`.profiling`) and timing helpers (:mod:`.measure`, :mod:`.machine`).
"""
