"""InternVideo-Next models: encoder, predictor, diffusion decoder, teacher and both stages' objectives.

``SiglipTeacher`` (a local SigLIP / SigLIP2 tower) imports transformers only when constructed.

Every attention, token gather/scatter, mask and diffusion step is an :mod:`invnext.nn` module
calling a public op of :mod:`invnext.ops`, so accelerated backends drop in without touching the
models; :func:`set_ops_backend` picks the backend of all those modules at once ("torch": the plain-PyTorch baseline) and
:func:`set_grad_checkpointing` turns on activation checkpointing per block.
"""
from invnext.models.decoder import DiffusionDecoder
from invnext.models.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderOutput
from invnext.models.hf_teacher import SiglipTeacher
from invnext.models.io import load_weights, save_weights
from invnext.models.modernbert import load_modernbert_layers
from invnext.models.predictor import Predictor
from invnext.models.stage1 import Stage1Model, kept_per_frame
from invnext.models.stage2 import Stage2Model
from invnext.models.switches import set_grad_checkpointing, set_ops_backend
from invnext.models.teacher import ConvPatchEmbed, ImageTeacher, TeacherOutput, TinyTeacher, build_teacher

__all__ = [
    "ConvPatchEmbed",
    "DiffusionDecoder",
    "Encoder",
    "EncoderOutput",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageTeacher",
    "Predictor",
    "SiglipTeacher",
    "Stage1Model",
    "Stage2Model",
    "TeacherOutput",
    "TinyTeacher",
    "build_teacher",
    "kept_per_frame",
    "load_modernbert_layers",
    "load_weights",
    "save_weights",
    "set_grad_checkpointing",
    "set_ops_backend",
]
