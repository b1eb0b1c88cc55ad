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

.PHONY: install test demo demo-runs compare compare-runs proposals finetune bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the CPU suite, in 2 processes of one thread each (faster than one process of two threads on 2 cores)
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests

# ---------------------------------------------------------------------------------------------------------
# The comparison: scratch, ImageNet, Direct P1x/P3x, Montage, PreDet, AlignDet -> the same fine-tune -> one
# table (common/results.py). Every stage is a file target (model_final.pth, results.json), so a re-run skips
# finished stages and resumes an interrupted one (--resume auto). SEEDS=N repeats every fine-tune over seeds
# 0..N-1 (the table shows mean ± std).
SEEDS ?= 1
SEED_LIST = $(shell seq 0 $$(( $(SEEDS) - 1 )))
PRETRAINED = direct-p1x direct-p3x montage predet aligndet
ROWS = scratch imagenet $(PRETRAINED) $(if $(LONG_SCRATCH),scratch-long)
expect = $(foreach r,$(ROWS),$(foreach s,$(SEED_LIST),ft-$(r)-s$(s)))

# finetune_from(root, row, fine-tune command): fine-tune row's model_final.pth; % = the seed
define finetune_from
$(1)/ft-$(2)-s%/results.json: $(1)/$(2)/model_final.pth
	$(3) --init $$< --seed $$* --output-dir $$(@D) --resume auto
endef

# --- make demo: CPU, the embedded synthetic set, ResNet-18 at 128 px, toy schedules (~15 min on 2 cores) ---
D = $(OUT)/demo
DEMO_FT = $(PY) finetune.py $(CPU_FT) $(DEMO_HEAD) --iters 50 --warmup-iters 10 --eval-batch-size 8 --print-freq 10
DEMO_HEAD = --box-head 2fc --detections-per-img 30  # the 2fc head: a third of 4conv1fc's CPU time
DEMO_JOBS ?= 2  # stages run two at a time, one thread each
DEMO_PRE = --backbone resnet18 --device cpu --workers 1 --print-freq 10
DEMO_DIRECT = --detector fasterrcnn $(DEMO_HEAD) --direct-size 128 --batch-size 8 --anchor-scale 0.5 \
	--rpn-batch-size 64 --roi-batch-size 32 --rpn-post-nms-train 300 --rpn-post-nms-test 100 --warmup-iters 4
DEMO_DIRECT_ITERS = 12
DEMO_MONTAGE = --montage-size 96 --montage-split 32 --batch-size 16 --iters 100 --warmup-iters 10 \
	--montage-erf-every 50 --montage-erf-batch 16
DEMO_PREDET = --preset cpu --box-head 2fc --anchor-scale 0.5 --predet-dim 64 --predet-num-queries 8 \
	--predet-post-nms 64 --predet-neg 32 --batch-size 4 --iters 12 --warmup-iters 3 --lr 0.02 --clip-grad 10
DEMO_ALIGNDET = --detector fasterrcnn $(DEMO_HEAD) --preset cpu --anchor-scale 0.5 --rpn-batch-size 64 \
	--roi-batch-size 16 --rpn-post-nms-train 300 --rpn-post-nms-test 100 --batch-size 4 --iters 16 --warmup-iters 4

demo: install
	@echo "toy scale: ResNet-18, 128-px synthetic shapes, minutes of CPU. These numbers are NOT paper numbers."
	OMP_NUM_THREADS=1 $(MAKE) -k -j $(DEMO_JOBS) demo-runs; status=$$?; \
	$(PY) -m common.results $(D) --expect $(expect); \
	echo "toy scale (ResNet-18, 128 px, tens of iterations on a CPU): these are NOT paper numbers"; exit $$status
demo-runs: $(foreach d,$(expect),$(D)/$(d)/results.json)

$(D)/direct-p1x/model_final.pth:
	$(PY) direct.py $(DEMO_PRE) $(DEMO_DIRECT) --iters $(DEMO_DIRECT_ITERS) --output-dir $(@D) --resume auto
$(D)/direct-p3x/model_final.pth:
	$(PY) direct.py $(DEMO_PRE) $(DEMO_DIRECT) --iters $$(( 3 * $(DEMO_DIRECT_ITERS) )) --output-dir $(@D) --resume auto
$(D)/montage/model_final.pth:
	$(PY) montage.py $(DEMO_PRE) $(DEMO_MONTAGE) --output-dir $(@D) --resume auto
$(D)/proposals.json:
	$(PY) -m common.proposals --method ss --workers 2 --out $@
$(D)/predet/model_final.pth: $(D)/proposals.json
	$(PY) predet.py $(DEMO_PRE) $(DEMO_PREDET) --predet-queries proposals --proposals $< --output-dir $(@D) --resume auto
$(D)/aligndet/model_final.pth: $(D)/montage/model_final.pth $(D)/proposals.json
	$(PY) alignDet.py $(DEMO_PRE) $(DEMO_ALIGNDET) --backbone-weights $< --align-proposals $(word 2,$^) \
		--output-dir $(@D) --resume auto

$(D)/ft-scratch-s%/results.json:
	$(DEMO_FT) --init scratch --seed $* --output-dir $(@D) --resume auto
$(D)/ft-scratch-long-s%/results.json:  # LONG_SCRATCH=1: scratch at 3x the fine-tuning schedule
	$(DEMO_FT) --init scratch --iters 300 --seed $* --output-dir $(@D) --resume auto
$(D)/ft-imagenet-s%/results.json:  # offline, torchvision cannot download the weights: the row says so
	-$(DEMO_FT) --init imagenet --seed $* --output-dir $(@D) --resume auto
$(foreach r,$(PRETRAINED),$(eval $(call finetune_from,$(D),$(r),$(DEMO_FT))))

# --- make compare: GPUs, COCO (DATA), DETECTOR=maskrcnn|fasterrcnn|retinanet|fcos, the papers' recipes ---
C = $(OUT)/compare/$(DETECTOR)
DATA_FLAGS = --data-path $(DATA)
COMPARE_FT = $(TORCHRUN) finetune.py $(DATA_FLAGS) --detector $(DETECTOR)

compare: install
	$(MAKE) -k compare-runs; status=$$?; \
	$(PY) -m common.results $(C) --expect $(expect); exit $$status
compare-runs: $(foreach d,$(expect),$(C)/$(d)/results.json)

$(C)/direct-p1x/model_final.pth:
	$(TORCHRUN) direct.py $(DATA_FLAGS) --detector $(DETECTOR) --schedule P1x --output-dir $(@D) --resume auto
$(C)/direct-p3x/model_final.pth:
	$(TORCHRUN) direct.py $(DATA_FLAGS) --detector $(DETECTOR) --schedule P3x --output-dir $(@D) --resume auto
$(C)/montage/model_final.pth:
	$(TORCHRUN) montage.py $(DATA_FLAGS) --output-dir $(@D) --resume auto
PROPOSALS = $(OUT)/compare/proposals_train2017_ss.json
proposals: install $(PROPOSALS)  # once before a multi-node compare: every node then finds the file
$(PROPOSALS):
	$(PY) -m common.proposals $(DATA_FLAGS) --method ss --workers $(shell nproc) --out $@
$(C)/predet/model_final.pth: $(PROPOSALS)
	$(TORCHRUN) predet.py $(DATA_FLAGS) --predet-queries proposals --proposals $< --output-dir $(@D) --resume auto
$(C)/aligndet/model_final.pth: $(PROPOSALS)
	$(TORCHRUN) alignDet.py $(DATA_FLAGS) --detector $(DETECTOR) --backbone-weights imagenet \
		--align-proposals $< --output-dir $(@D) --resume auto

$(C)/ft-scratch-s%/results.json:
	$(COMPARE_FT) --init scratch --seed $* --output-dir $(@D) --resume auto
$(C)/ft-scratch-long-s%/results.json:  # LONG_SCRATCH=1: scratch at 3x (36 epochs), as the papers' baselines
	$(COMPARE_FT) --init scratch --epochs 36 --lr-steps 30 34 --seed $* --output-dir $(@D) --resume auto
$(C)/ft-imagenet-s%/results.json:
	$(COMPARE_FT) --init imagenet --seed $* --output-dir $(@D) --resume auto
$(foreach r,$(PRETRAINED),$(eval $(call finetune_from,$(C),$(r),$(COMPARE_FT))))

# one fine-tune: make finetune DATA=/data/coco DETECTOR=retinanet INIT=imagenet|scratch|path/to/model_final.pth
finetune: install
	$(TORCHRUN) finetune.py --data-path $(DATA) --detector $(DETECTOR) --init $(INIT) \
		--output-dir $(OUT)/finetune/$(DETECTOR)_$(subst /,-,$(INIT)) --resume auto

bench: install
	$(PY) -m common.bench

clean-venv:
	rm -rf $(VENV)
