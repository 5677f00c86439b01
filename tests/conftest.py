"""The suite runs on the CPU in float32 on any host. On a GPU host the ranks would otherwise pick a GPU each by
LOCAL_RANK (rank 1 asks for cuda:1 on a one-GPU host), train.py's --dtype auto would mean bfloat16, and the
float32 tolerances of the sampler/trainer log-prob checks would fail. Hiding the GPUs here, before anything
imports torch, reaches every process the tests start (tests/launch.py passes this environment on)."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
