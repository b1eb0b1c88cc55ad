# Detection pre-training methods (AlignDet, PreDet, Direct, Montage) compared under one fine-tuning protocol.
# On a fresh clone `make demo` and `make test` do all the set-up (a virtual environment in .venv).
#
# GPU targets launch with torchrun: NGPU processes on each of NNODES nodes. Multi-node: run the same
# `make <target> NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address>` on every node.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1

NGPU ?= 8
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
DATA ?= data/coco
OUT ?= runs
DETECTOR ?= maskrcnn
INIT ?= imagenet

TORCHRUN = $(PY) -m torch.distributed.run --nnodes=$(NNODES) --node_rank=$(NODE_RANK) \
	--nproc_per_node=$(NGPU) --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)

# The CPU configuration of the demos: ResNet-18, 128-px images, small RPN/RoI sampling (see README).
CPU_DET = --backbone resnet18 --preset cpu --anchor-scale 0.5 --rpn-batch-size 64 --roi-batch-size 64 \
	--rpn-post-nms-train 300 --rpn-post-nms-test 100 --workers 1 --device cpu
CPU_FT = $(CPU_DET) --detector fasterrcnn --batch-size 4 --lr 0.02 --warmup-iters 50 --clip-grad 10

.PHONY: install test demo finetune bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

test: install
	$(PY) -m pytest -q tests

# CPU, synthetic data: fine-tune Faster R-CNN R18 from scratch and evaluate it (a few minutes on 2 cores).
demo: install
	$(PY) finetune.py --init scratch $(CPU_FT) --iters 250 --output-dir $(OUT)/demo/finetune-scratch --resume auto

# GPU, COCO: the 1x fine-tune of DETECTOR from INIT (scratch | imagenet | a model_final.pth).
finetune: install
	$(TORCHRUN) finetune.py --data-path $(DATA) --detector $(DETECTOR) --init $(INIT) \
		--output-dir $(OUT)/finetune/$(DETECTOR)_$(subst /,-,$(INIT)) --resume auto

bench: install
	$(PY) -m common.bench

clean-venv:
	rm -rf $(VENV)
