"""The same job in each job-queue library people pick for LLM work, side by side with chatq.

The job: take a question, stream the answer from llmsim through the openai SDK, write the
answer to Redis, ack. Each peer's worker is written the way its own documentation shows
(`job.py` holds the one body they all run); `run.py` starts the same servers for all,
loads each with the same jobs and measures answers/s, CPU-ms per answer and peak RSS per
worker process, and the enqueue side (a FastAPI endpoint per library, one uvicorn process).
Each library runs in a venv of its own under ~/.cache/chatq/peers-venv/, made on the first run.

    .venv/bin/python -m bench.peers.run [--jobs 2000] [--quick]
"""
