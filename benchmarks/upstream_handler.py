"""Baseline for the benchmarks: a handler that behaves like TorchServe's upstream ``examples/diffusers`` one.

It keeps what costs time in the upstream example: one pipeline call per request, a PIL image turned into a
nested Python list, and TorchServe's own serialisation of that list (``json.dumps(indent=2)``, about 26 MB
at 768x768). Two changes make it runnable in the benchmark without touching the upstream behaviour being
measured: the pipeline is packed as a plain folder (``model/``, where upstream unzips ``model.zip``) and
loaded with ``local_files_only``, and steps and size come from model-config.yaml's ``baseline:`` section
instead of the hard-coded 50 steps at 768x768, so the benchmark can compare it at 2 steps too.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

PIPELINE_FOLDER = "model"
GUIDANCE_SCALE = 7.5


class UpstreamDiffusersHandler(BaseHandler):
    """Text-to-image as upstream does it: text/plain prompt in, HxWx3 list of values out."""

    def initialize(self, context):
        properties = context.system_properties
        self.device = torch.device(
            f"cuda:{properties['gpu_id']}"
            if torch.cuda.is_available() and properties.get("gpu_id") is not None else "cpu"
        )
        baseline = (context.model_yaml_config or {}).get("baseline", {})
        self.call_arguments = {
            "guidance_scale": GUIDANCE_SCALE,
            "num_inference_steps": int(baseline.get("num_inference_steps", 50)),
            "height": int(baseline.get("height", 768)),
            "width": int(baseline.get("width", 768)),
        }
        self.pipe = DiffusionPipeline.from_pretrained(Path(properties["model_dir"]) / PIPELINE_FOLDER,
                                                      local_files_only=True)
        self.pipe.to(self.device)
        logger.info("upstream-style pipeline loaded, %s, %d torch threads", self.call_arguments,
                    torch.get_num_threads())
        self.initialized = True

    def preprocess(self, requests):
        prompts = []
        for row in requests:
            text = row.get("data")
            if text is None:
                text = row.get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode("utf-8")
            prompts.append(text)
        return prompts

    def inference(self, prompts, *args, **kwargs):
        return self.pipe(prompts, **self.call_arguments).images

    def postprocess(self, images):
        return [np.array(image).tolist() for image in images]
