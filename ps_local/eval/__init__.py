"""`ps-local eval`: methods side by side on a task, graded in a sandbox, resumable.

    tasks.py       MATH500, HumanEval and JSONL tasks: problems, prompts, graders
    run_config.py  the configuration a results folder holds, and its fingerprint
    run.py         sampling and grading a plan, streamed to OUT/results*.jsonl
    summary.py     accuracy and pass@k per method; which folders merge
    grading/       the graders, and the sandbox model-written programs run in
"""
