"""Entry point of the Gradio app (a Hugging Face Space runs this file): `python app.py`.

GRADIO_SERVER_NAME / GRADIO_SERVER_PORT choose where it listens; WORKBENCH_CONCURRENCY how many
heavy jobs run at once. Models load only when a user asks, so the app starts in seconds.
The WORKBENCH_MAX_* / WORKBENCH_SESSION_JOBS / WORKBENCH_JOB_SECONDS variables bound each request,
and on a Space (or with WORKBENCH_PUBLIC=1) public mode keeps server files out of reach; see
workbench/limits.py and the README's "Using the app".
"""

import logging

from workbench.ui.gradio_app import build_app, launch

demo = build_app()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    launch(demo)
