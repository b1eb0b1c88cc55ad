# Detection pre-training methods (AlignDet, PreDet, Direct, Montage) compared under one fine-tuning protocol.
# On a fresh clone `make demo` and `make test` do all the set-up (a virtual environment in .venv).
#
# GPU targets launch with torchrun: NGPU processes on each of NNODES nodes. Multi-node: run the same
# `make <target> NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address>` on every node.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# a torch / torchvision pair the suite passed with (requirements.txt lists them and declares their range): the
# newest this project's machines install (their pip caps torch at 2.14.1; 2.15.0 passed in a venv of its own)
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

# Up-front checks, one line each, before anything starts (a dry run, make -n, only shows the plan): a COCO-format
# set at DATA for the targets that read it, and NGPU visible GPUs for the torchrun targets.
comma := ,
ifeq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
ifneq ($(filter finetune compare compare-runs proposals,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(DATA)/annotations/instances_train2017.json $(DATA)/annotations.json),)
$(error DATA=$(DATA): no COCO set there (expected annotations/instances_train2017.json with train2017/ and val2017/, or images/ + annotations.json); e.g. make $(firstword $(MAKECMDGOALS)) DATA=/path/to/coco)
endif
endif
ifneq ($(filter finetune compare compare-runs,$(MAKECMDGOALS)),)
GPUS_VISIBLE := $(if $(CUDA_VISIBLE_DEVICES),$(words $(subst $(comma), ,$(CUDA_VISIBLE_DEVICES))),$(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'))
ifneq ($(shell test "$(NGPU)" -le "$(GPUS_VISIBLE)" 2>/dev/null && echo ok),ok)
$(error NGPU=$(NGPU) processes per node, but $(GPUS_VISIBLE) CUDA GPUs are visible here: set NGPU to this node's GPU count; on a CPU use make demo or python finetune.py (README: CPU configuration))
endif
endif
endif

.PHONY: install test demo demo-first demo-runs demo-table demo-claims claims-runs claims-table compare compare-runs \
	compare-table proposals finetune bench clean-venv
.SECONDARY:  # keep every model_final.pth a pattern rule made on the way (make deletes intermediates otherwise)
.SECONDEXPANSION:

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PKGS)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# the CPU suite, in 2 processes of one thread each (faster than one process of two threads on 2 cores); a
# passing test's tmp_path is deleted when it ends (tests/pytest.ini, so also under a plain pytest tests: its runs'
# checkpoints are about 20 GB over the suite), a failing test's is kept to look at.
# Then the tests that hold two computations of one quantity to a float tolerance (marker numerics: 2 processes
# against 1, batched against single-image kernels, a loss against its formula) once more under another CPU's
# kernels: PyTorch's scalar ones (ATEN_CPU_CAPABILITY=default) and oneDNN's AVX2 convolutions, which round
# otherwise than this machine's (AVX-512 or AVX2) on any x86-64 CPU, so that a tolerance fitted to one machine
# fails here, not on a user's. Resumes are not among them: a resume repeats the same kernels in the same order,
# bit-identical under any kernel set. The second pass takes about an eighth of the first (2 min against 15 in one
# run on 2 busy cores).
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) tests
	OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -n $(TEST_WORKERS) \
		-m numerics tests

# ---------------------------------------------------------------------------------------------------------
# The comparison: scratch, ImageNet and every pre-training -> the same fine-tune of the same detector, each
# with its paper's fine-tuning recipe (finetune.py --protocol paper) -> one table with the compute of every row
# and the papers' claims tested on it (common/results.py). Every stage is a file target (model_final.pth,
# results.json), so a re-run skips finished stages and resumes an interrupted one (--resume auto). SEEDS=N
# repeats the fine-tunes (and in the demo the pre-trainings) over seeds 0..N-1: the table shows mean ± std.
SEEDS ?= 1
SEED_LIST = $(shell seq 0 $$(( $(SEEDS) - 1 )))
expect = $(foreach r,$(1),$(foreach s,$(SEED_LIST),ft-$(r)-s$(s)))
claim_flags = $(foreach c,$(1),--claim '$(c)')

# --- make demo: CPU, the embedded synthetic set, ResNet-18 at 128 px (13 min on 2 cores, set-up included) ------
# The smoke and teaching run: every method end to end, one seed, each pretext's measure against chance printed in
# the table; it decides no claim (make demo-claims does). Its settings are protocol v4's (below) at smaller
# budgets, each long enough for its pretext to learn visibly, except PreDet's L_cls-only ablation, which reaches
# its label prior in 100 iterations and no further (+0.11 -> +0.01 nats; the protocol gives it 359: RESULTS.md):
# - fine-tune: Faster R-CNN R18-FPN (2fc box head, a third of 4conv1fc's CPU time), short side 128, batch 4,
#   60 iterations, warm-up 6, lr x0.1 at 8/12 and 11/12, the 1x lr 0.02 (x4 the linear rule: tens of
#   iterations), each paper's recipe;
# - pre-trainings of one to two fine-tunes' compute: Direct 64 it, Montage 160, AlignDet 120 on Montage's
#   backbone (its official RoI sampling), PreDet and its L_cls-only ablation 100 (protocol v4's toy views);
# - every pre-training's lr is its paper's, scaled linearly to the toy batch; gradients clipped at norm 10 in
#   every run (PreDet diverged without); warm-up 10% of the run; lr steps and cosine at the paper's fractions
#   of the run; AlignDet's EMA momentum 0.9 (the paper's 0.996 would leave the teacher at its initialisation
#   over a hundred iterations);
# - seed s pre-trains with seed s and fine-tunes that checkpoint with seed s.
D = $(OUT)/demo
DATA_CACHE ?= data
SHAPES ?= $(DATA_CACHE)/shapes/annotations/instances_val.json
DEMO_JOBS ?= 2  # stages run two at a time, one thread each
DEMO_PRETRAINED = aligndet montage predet predet-cls direct-p1x  # AlignDet's chain (after Montage) is the longest
DEMO_ROWS = $(DEMO_PRETRAINED) scratch imagenet $(if $(LONG_SCRATCH),scratch-long)
CPU_DET = --backbone resnet18 --anchor-scale 0.5 --rpn-batch-size 64 --rpn-post-nms-train 300 \
	--rpn-post-nms-test 100 --detector fasterrcnn --box-head 2fc --detections-per-img 30
DEMO_RUN = --device cpu --workers 1 --print-freq 10 --clip-grad 10
DEMO_FT = $(PY) finetune.py $(CPU_DET) $(DEMO_RUN) --preset cpu --roi-batch-size 64 --batch-size 4 \
	--base-lr 0.02 --iters 60 --warmup-iters 6 --eval-batch-size 8
DEMO_DIRECT = $(CPU_DET) --direct-size 96 --roi-batch-size 32 --batch-size 8 --lr 0.01 --iters 64 --warmup-iters 6
DEMO_MONTAGE = --backbone resnet18 --montage-size 96 --montage-split 32 --batch-size 16 --lr 0.025 --iters 160 \
	--warmup-iters 16 --montage-erf-every 40 --montage-erf-batch 16
DEMO_PREDET = --backbone resnet18 --preset cpu --box-head 2fc --anchor-scale 0.5 --predet-dim 64 \
	--predet-num-queries 8 --predet-post-nms 64 --predet-neg 32 --batch-size 4 --lr 0.0015625 --iters 100 \
	--warmup-iters 10 --predet-queries proposals --predet-crop-scale 0.5 1.0 --predet-color-strength 0.5
DEMO_ALIGNDET = $(CPU_DET) --preset cpu --batch-size 4 --lr 0.005 --iters 120 --warmup-iters 12 --align-ema 0.9

DEMO_NOTE = make demo is the smoke and teaching run: no compute-matched scratch, so this table decides no claim \
	(make demo-claims does: RESULTS.md, protocol v4).
# The table is a target of its own, made by a sub-make: make runs a line that starts a sub-make also under
# make -n (the sub-make inherits -n), so that a dry run prints the table's command instead of running it. A
# failed table (a run failed or unreadable, bad input) fails the pipeline: its status, no closing line.
demo: install
	@echo "toy scale: ResNet-18, 128-px synthetic shapes, minutes of CPU. These numbers are NOT paper numbers."
	OMP_NUM_THREADS=1 $(MAKE) -k -j $(DEMO_JOBS) demo-first; \
	OMP_NUM_THREADS=1 $(MAKE) -k -j $(DEMO_JOBS) demo-runs; status=$$?; \
	$(MAKE) demo-table || exit $$?; \
	echo "toy scale (ResNet-18, 128 px, tens of iterations on a CPU): these are NOT paper numbers"; exit $$status
demo-table:
	$(PY) -m common.results $(D) --expect $(call expect,$(DEMO_ROWS)) --note "$(DEMO_NOTE)"
# make -j starts jobs in one pass over the goals and skips a goal whose inputs are still being made until the
# next pass: the Montage backbones and the proposals go first (with Direct beside them), so that AlignDet's chain
# does not come last
demo-first: $(foreach s,$(SEED_LIST),$(D)/montage-s$(s)/model_final.pth) $(D)/proposals.json \
	$(foreach s,$(SEED_LIST),$(D)/direct-p1x-s$(s)/model_final.pth)
demo-runs: $(foreach r,$(DEMO_PRETRAINED),$(foreach s,$(SEED_LIST),$(D)/$(r)-s$(s)/model_final.pth)) \
	$(foreach d,$(call expect,$(DEMO_ROWS)),$(D)/$(d)/results.json)

$(SHAPES):  # once, before the stages that read it start in parallel
	$(PY) -m common.synthetic --out $(patsubst %/annotations/instances_val.json,%,$@)
$(D)/proposals.json: | $(SHAPES)
	$(PY) -m common.proposals --method ss --workers 2 --out $@
$(D)/direct-p1x-s%/model_final.pth: | $(SHAPES)
	$(PY) direct.py $(DEMO_RUN) $(DEMO_DIRECT) --seed $* --output-dir $(@D) --resume auto
$(D)/montage-s%/model_final.pth: | $(SHAPES)
	$(PY) montage.py $(DEMO_RUN) $(DEMO_MONTAGE) --seed $* --output-dir $(@D) --resume auto
$(D)/predet-s%/model_final.pth: $(D)/proposals.json
	$(PY) predet.py $(DEMO_RUN) $(DEMO_PREDET) --proposals $< --seed $* --output-dir $(@D) --resume auto
$(D)/predet-cls-s%/model_final.pth: $(D)/proposals.json  # PreDet's Table 1 ablation: L_cls only
	$(PY) predet.py $(DEMO_RUN) $(DEMO_PREDET) --predet-no-det --proposals $< --seed $* --output-dir $(@D) \
		--resume auto
$(D)/aligndet-s%/model_final.pth: $(D)/montage-s%/model_final.pth $(D)/proposals.json
	$(PY) alignDet.py $(DEMO_RUN) $(DEMO_ALIGNDET) --backbone-weights $< --align-proposals $(word 2,$^) \
		--seed $* --output-dir $(@D) --resume auto

$(D)/ft-scratch-s%/results.json: | $(SHAPES)
	$(DEMO_FT) --init scratch --seed $* --output-dir $(@D) --resume auto
$(D)/ft-scratch-long-s%/results.json: | $(SHAPES)  # LONG_SCRATCH=1: scratch at 3x the fine-tuning schedule
	$(DEMO_FT) --init scratch --iters 180 --warmup-iters 18 --seed $* --output-dir $(@D) --resume auto
$(D)/ft-imagenet-s%/results.json: | $(SHAPES)  # offline, torchvision cannot download the weights: the row says so
	$(DEMO_FT) --init imagenet --seed $* --output-dir $(@D) --resume auto || grep -qs '^skipped:' $(@D)/error.txt
$(D)/ft-%/results.json: $(D)/%/model_final.pth  # ft-<row>-s<seed> from <row>-s<seed>
	$(DEMO_FT) --init $< --seed $(lastword $(subst -s, ,$*)) --output-dir $(@D) --resume auto

# --- make demo-claims: the toy protocol v4, the one that decides claims (CPU, 2 cores, ~2-2.5 h, 3 seeds) -------
# Written down and committed before any of its runs (RESULTS.md, "Protocol v4"). make demo above is the smoke
# and teaching run: one seed, no compute-matched baseline, it decides nothing. v4 is v3 with a learning check
# that reads each pretext against its chance level, and budgets under which every pretext learns:
# - Compute is counted in training FLOPs (Run.train_flops: the convolutions and matrix products of an iteration,
#   forward and backward, averaged over the first iteration of every logged window, times the iterations;
#   Montage's ERF passes counted apart and added), everywhere: budgets, the table, the plot, the matching.
#   Device-hours are reported beside them, never compared.
# - B = the scratch fine-tune's FLOPs (60 it x 101.4 GFLOP = 6.08 TFLOP). Budgets, chosen on pilot seed 100 by the
#   pretext measures alone (RESULTS.md): Direct 1 B (75 it at 81.5 GFLOP/it; v3's, it learned); AlignDet 3 B, its
#   Montage backbone 0.5 B (87 it at 31.3 + 106.6 per ERF pass) and its box-domain stage 2.5 B (141 it at 107.6);
#   Montage 3 B (535 it), the same as AlignDet's chain, so that aligndet-common > montage compares equal compute;
#   PreDet 4 B (229 it at 106.0) and its L_cls-only ablation 4 B (359 it at 67.8).
# - Each stage keeps its paper's schedule shape (Direct fixed, Montage cosine, PreDet four x0.1 steps at uniform
#   fractions, AlignDet x0.1 at 8/12 and 11/12) with a linear warm-up over 10% of its iterations; one lr rule for
#   all: the paper's lr scaled linearly to the toy batch; gradients clipped at norm 10 (the share of clipped steps
#   is in every run's meta); AlignDet's EMA momentum 0.9; Montage's ERF every 40 iterations.
# - Deviations from v3, each from the pilots: AlignDet samples its RoIs as its official config does (every
#   positive, up to 4096 per image; v3: 16); PreDet's views are a toy strength of MoCo v2's (crop area 0.5-1, colour
#   ops x0.5: --predet-crop-scale 0.5 1 --predet-color-strength 0.5), under which its pretext learns (the paper's
#   plateaus at 4 B).
# - Fine-tune: v3's (Faster R-CNN R18-FPN 2fc, 128 px, batch 4, 60 it, warm-up 6, steps at 8/12 and 11/12, lr
#   0.02), each pre-training with its paper's recipe; aligndet also with the common recipe (aligndet-common).
# - Scratch as a curve: 1x, 2x, 4x, 8x the fine-tune (60, 120, 240, 480 it; warm-up 10%, steps at 8/12, 11/12),
#   which covers every row's total (at most 5 B).
# - Seeds 0, 1, 2: seed s pre-trains and fine-tunes; rows are paired by seed.
# - Learning check per stage (common.claims.PRETEXT_MEASURE): the pretext's measure against chance in its last
#   full logged window (10 iterations) is at least a fall below its first and below chance: AlignDet
#   contrast_vs_chance 0.20 nats, PreDet info_vs_chance 0.40 (the ablation: cls_vs_chance 0.10), Montage
#   cls_vs_chance 0.10 (3 sd of two windows of one network, measured at lr 1e-12); Direct's detection loss 20%.
#   Every stage of a chain must pass; a claim on a row whose pretext did not learn is undecidable, said so.
# - Claims: "X > scratch" against scratch at X's total compute (pre-training + fine-tune), read off the same
#   seed's scratch curve (AP interpolated linearly in log FLOPs); "A > B" between methods paired by seed.
#   Three verdicts of a one-sided paired t-test at 5%: held, opposite, inconclusive, each with n, the 5%
#   threshold and the difference detectable with 80% power (common.claims).
CL = $(OUT)/claims
CLAIM_SEEDS ?= 0 1 2
CLAIM_ROWS = direct-p1x montage aligndet aligndet-common predet predet-cls scratch scratch-2x scratch-4x scratch-8x
CLAIMS = direct-p1x>scratch montage>scratch aligndet-common>montage predet>predet-cls predet>scratch
claim_expect = $(foreach r,$(CLAIM_ROWS),$(foreach s,$(CLAIM_SEEDS),ft-$(r)-s$(s)))
# The same protocol on a GPU at a larger scale: make demo-claims OUT=runs-gpu CLAIM_DEVICE=cuda CLAIM_SCALE=2
# CLAIM_JOBS=6 multiplies every iteration count (warm-ups included) by 2, which keeps every budget ratio.
CLAIM_DEVICE ?= cpu
CLAIM_SCALE ?= 1
CLAIM_JOBS ?= $(DEMO_JOBS)
CLAIM_WORKERS ?= 1
x = $(shell echo $$(( $(1) * $(CLAIM_SCALE) )))
CLAIM_RUN = --device $(CLAIM_DEVICE) --workers $(CLAIM_WORKERS) --print-freq 10 --clip-grad 10
CLAIM_FT = $(PY) finetune.py $(CPU_DET) $(CLAIM_RUN) --preset cpu --roi-batch-size 64 --batch-size 4 --base-lr 0.02 \
	--eval-batch-size 8
CLAIM_DIRECT = $(CPU_DET) --direct-size 96 --roi-batch-size 32 --batch-size 8 --lr 0.01 --iters $(call x,75) \
	--warmup-iters $(call x,8)
CLAIM_MONTAGE = --backbone resnet18 --montage-size 96 --montage-split 32 --batch-size 16 --lr 0.025 \
	--montage-erf-every $(call x,40) --montage-erf-batch 16
CLAIM_PREDET = --backbone resnet18 --preset cpu --box-head 2fc --anchor-scale 0.5 --predet-dim 64 \
	--predet-num-queries 8 --predet-post-nms 64 --predet-neg 32 --batch-size 4 --lr 0.0015625 --predet-queries proposals \
	--predet-crop-scale 0.5 1.0 --predet-color-strength 0.5
CLAIM_ALIGNDET = $(CPU_DET) --preset cpu --batch-size 4 --lr 0.005 --iters $(call x,141) --warmup-iters $(call x,14) \
	--align-ema 0.9

demo-claims: install
	@echo "toy protocol v4 (RESULTS.md): 3 seeds, scratch as a curve, compute in FLOPs; about 2-2.5 h on 2 cores"
	OMP_NUM_THREADS=1 $(MAKE) -k -j $(CLAIM_JOBS) claims-runs; status=$$?; \
	$(MAKE) claims-table || exit $$?; \
	echo "toy scale (ResNet-18, 128 px): these are NOT paper numbers"; exit $$status
claims-table:  # a sub-make of demo-claims, as demo-table
	$(PY) -m common.results $(CL) --expect $(claim_expect) $(call claim_flags,$(CLAIMS)) --learned-drop 0.2
# the longest stages first: make -j starts the goals in this order
claims-runs: $(foreach s,$(CLAIM_SEEDS),$(CL)/ft-scratch-8x-s$(s)/results.json $(CL)/montage-half-s$(s)/model_final.pth \
	$(CL)/predet-s$(s)/model_final.pth $(CL)/predet-cls-s$(s)/model_final.pth) \
	$(foreach d,$(claim_expect),$(CL)/$(d)/results.json)

$(CL)/proposals.json: | $(SHAPES)
	$(PY) -m common.proposals --method ss --workers 2 --out $@
$(CL)/direct-p1x-s%/model_final.pth: | $(SHAPES)
	$(PY) direct.py $(CLAIM_RUN) $(CLAIM_DIRECT) --seed $* --output-dir $(@D) --resume auto
$(CL)/montage-s%/model_final.pth: | $(SHAPES)
	$(PY) montage.py $(CLAIM_RUN) $(CLAIM_MONTAGE) --iters $(call x,535) --warmup-iters $(call x,54) --seed $* \
		--output-dir $(@D) --resume auto
$(CL)/montage-half-s%/model_final.pth: | $(SHAPES)  # AlignDet's backbone: 0.5 B
	$(PY) montage.py $(CLAIM_RUN) $(CLAIM_MONTAGE) --iters $(call x,87) --warmup-iters $(call x,9) --seed $* \
		--output-dir $(@D) --resume auto
$(CL)/aligndet-s%/model_final.pth: $(CL)/montage-half-s%/model_final.pth $(CL)/proposals.json
	$(PY) alignDet.py $(CLAIM_RUN) $(CLAIM_ALIGNDET) --backbone-weights $< --align-proposals $(word 2,$^) \
		--seed $* --output-dir $(@D) --resume auto
$(CL)/predet-s%/model_final.pth: $(CL)/proposals.json
	$(PY) predet.py $(CLAIM_RUN) $(CLAIM_PREDET) --iters $(call x,229) --warmup-iters $(call x,23) --proposals $< \
		--seed $* --output-dir $(@D) --resume auto
$(CL)/predet-cls-s%/model_final.pth: $(CL)/proposals.json
	$(PY) predet.py $(CLAIM_RUN) $(CLAIM_PREDET) --iters $(call x,359) --warmup-iters $(call x,36) --predet-no-det \
		--proposals $< --seed $* --output-dir $(@D) --resume auto

$(CL)/ft-scratch-s%/results.json: | $(SHAPES)
	$(CLAIM_FT) --init scratch --iters $(call x,60) --warmup-iters $(call x,6) --seed $* --output-dir $(@D) --resume auto
$(CL)/ft-scratch-2x-s%/results.json: | $(SHAPES)
	$(CLAIM_FT) --init scratch --iters $(call x,120) --warmup-iters $(call x,12) --seed $* --output-dir $(@D) \
		--resume auto
$(CL)/ft-scratch-4x-s%/results.json: | $(SHAPES)
	$(CLAIM_FT) --init scratch --iters $(call x,240) --warmup-iters $(call x,24) --seed $* --output-dir $(@D) \
		--resume auto
$(CL)/ft-scratch-8x-s%/results.json: | $(SHAPES)
	$(CLAIM_FT) --init scratch --iters $(call x,480) --warmup-iters $(call x,48) --seed $* --output-dir $(@D) \
		--resume auto
$(CL)/ft-aligndet-common-s%/results.json: $(CL)/aligndet-s%/model_final.pth
	$(CLAIM_FT) --init $< --protocol common --iters $(call x,60) --warmup-iters $(call x,6) --seed $* \
		--output-dir $(@D) --resume auto
$(CL)/ft-%/results.json: $(CL)/%/model_final.pth  # ft-<row>-s<seed> from <row>-s<seed>
	$(CLAIM_FT) --init $< --iters $(call x,60) --warmup-iters $(call x,6) --seed $(lastword $(subst -s, ,$*)) \
		--output-dir $(@D) --resume auto

# --- make compare: GPUs, COCO (DATA), DETECTOR=maskrcnn|fasterrcnn|retinanet|fcos, the papers' recipes ---
C = $(OUT)/compare/$(DETECTOR)
DATA_FLAGS = --data-path $(DATA)
COMPARE_FT = $(TORCHRUN) finetune.py $(DATA_FLAGS) --detector $(DETECTOR)

COMPARE_ROWS = scratch imagenet direct-p1x direct-p3x montage predet aligndet $(if $(LONG_SCRATCH),scratch-long)
COMPARE_CLAIMS = direct-p1x>imagenet direct-p3x>imagenet montage>imagenet predet>imagenet aligndet>imagenet

compare: install
	$(MAKE) -k compare-runs; status=$$?; $(MAKE) compare-table || exit $$?; exit $$status
compare-runs: $(foreach d,$(call expect,$(COMPARE_ROWS)),$(C)/$(d)/results.json)
compare-table:  # a sub-make of compare, as demo-table
	$(PY) -m common.results $(C) --expect $(call expect,$(COMPARE_ROWS)) $(call claim_flags,$(COMPARE_CLAIMS))

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
$(C)/ft-%/results.json: $$(C)/$$(call pretraining,$$*)/model_final.pth  # ft-<row>-s<seed> from <row>: one per row
	$(COMPARE_FT) --init $< --seed $(lastword $(subst -s, ,$*)) --output-dir $(@D) --resume auto
pretraining = $(patsubst %-s$(lastword $(subst -s, ,$(1))),%,$(1))

# one fine-tune: make finetune DATA=/data/coco DETECTOR=retinanet INIT=imagenet|scratch|path/to/model_final.pth
finetune: install
	$(TORCHRUN) finetune.py --data-path $(DATA) --detector $(DETECTOR) --init $(INIT) \
		--output-dir $(OUT)/finetune/$(DETECTOR)_$(subst /,-,$(INIT)) --resume auto

bench: install
	$(PY) -m tests.bench

clean-venv:
	rm -rf $(VENV)

# A fine-tune's results.json that does not parse (a copy cut short, a crash mid-write of a run from before
# finetune.py wrote it atomically) is not a finished stage: FORCE makes the stage run again, and its --resume auto
# evaluates the finished model again (or trains what is missing). Checked with the bootstrap python (stdlib only).
define json_unparsable
import json, sys
for path in sys.argv[1:]:
    try:
        json.load(open(path))
    except (OSError, ValueError):
        print(path)
endef
UNPARSABLE_RESULTS := $(shell $(PYTHON) -c '$(json_unparsable)' $(wildcard $(D)/ft-*/results.json \
	$(CL)/ft-*/results.json $(C)/ft-*/results.json))
$(UNPARSABLE_RESULTS): FORCE
.PHONY: FORCE  # phony, else .SECONDARY (every target) lets a missing FORCE count as made
FORCE:
