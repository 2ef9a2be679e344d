"""CPU benchmarks. Run each entry point from the repository root as a module:

    python -m benchmarks.bench_pretrain --out outputs/bench/pretrain.json
    python -m benchmarks.training_loop --out outputs/bench/training_loop.json
    python -m benchmarks.bench_upstream --out outputs/bench/upstream.json
    python -m benchmarks.data_pipeline --out outputs/bench/data_pipeline.json   (also inside bench_pretrain)

``bench_pretrain`` puts together the student training step (:mod:`.student_step`), the CLAP
teacher (:mod:`.teacher`) and the data pipeline (:mod:`.data_pipeline`), measured with the
shared FLOP counting (:mod:`.flops`), ``torch.mm`` reference (:mod:`.matmul`), profiler
summary (:mod:`.profiling`) and timing helpers (:mod:`.measure`, :mod:`.machine`).
``training_loop`` runs ``fairseq-hydra-train`` itself and puts its clips/s next to the
isolated step's.
"""
