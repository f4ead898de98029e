#!/usr/bin/env bash
# Stage-1 ablation grid on the embedded catalog, paired by seed (docs/stage1.md).
#
#   launch/ablate_stage1.sh [OUT_DIR] [SEEDS] [ARMS]
#   OUT_DIR  default /tmp/afmrl_ablate
#   SEEDS    default "0 1 2 3 4"   (>= 5 for the published table)
#   ARMS     default: every arm below
# Environment: PRESET (default tiny), STEPS (default: the preset's), MARGIN (uniform-margin control,
# default 1.0), MINED (the mining flags of the *_mined arms), EXTRA (more --config overrides for every
# run), PYTHON (default .venv/bin/python),
# BASELINE (the arm of the paired differences, default infonce), PAIRS (more paired differences for the
# report, "A:B C:D", see launch/ablate_report.py --pairs), SFT_ATTRIBUTES and RAR_ATTRIBUTES (the
# generate stage's attributes.jsonl of the SFT and of the RAR generator, for agcl_sft_enriched and
# agcl_rar_enriched).
#
# The mined-negatives question (does attribute guidance beat a uniform margin once hard negatives are in
# the batch?):
#   STEPS=200 BASELINE=uniform_margin PAIRS="agcl_mined:uniform_margin_mined infonce_mined:infonce" \
#     launch/ablate_stage1.sh /tmp/ablate_mining "0 1 2 3 4" \
#     "infonce uniform_margin agcl agcl_published infonce_mined uniform_margin_mined agcl_mined \
#      agcl_published_mined agcl_mined_attribute_filter agcl_mined_score_filter"
#
# Seeds change the model init, the batch order and the fresh views (model.param_seed,
# pipeline.seed); the catalog is the same for every run, so arms are compared on the same data
# and seed k of one arm is paired with seed k of another. Finished runs (summary.json present) are
# skipped, so the script can be stopped and restarted. At the end it prints the table
# (launch/ablate_report.py): mean +- std per arm and the paired difference to the baseline arm.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/afmrl_ablate}
SEEDS=${2:-"0 1 2 3 4"}
PRESET=${PRESET:-tiny}
MARGIN=${MARGIN:-1.0}
PYTHON=${PYTHON:-.venv/bin/python}
EXTRA=${EXTRA:-}
MINED=${MINED:-"--config.mining.enabled=True --config.mining.every=100 --config.mining.num_mined=8 --config.mining.per_query=2"}
STEPS_FLAG=""
if [[ -n "${STEPS:-}" ]]; then STEPS_FLAG="--config.train.num_steps=${STEPS}"; fi

declare -A ARM_FLAGS=(
  [infonce]="--config.loss.bias_scale=0"
  [agcl_published]="--config.loss.bias_scale=1 --config.loss.bm25_norm=none --config.loss.bias_on=all"
  [agcl]=""
  [uniform_margin]="--config.loss.uniform_margin=${MARGIN}"
  [agcl_mask_margin]="--config.loss.mask=margin --config.loss.delta=0.1"
  [agcl_mask_attribute]="--config.loss.mask=attribute"
  [agcl_mask_positive]="--config.loss.mask=positive --config.loss.delta=0.9"
  [agcl_family_mixed]="--config.pipeline.batching=family_mixed --config.pipeline.family_share=0.5"
  [infonce_family_mixed]="--config.loss.bias_scale=0 --config.pipeline.batching=family_mixed"
  [agcl_no_duplicates]="--config.catalog.duplicate_share=0.0"
  [infonce_no_duplicates]="--config.loss.bias_scale=0 --config.catalog.duplicate_share=0.0"
  [infonce_enriched]="--config.loss.bias_scale=0 --config.attributes.enrich_queries=True"
  [agcl_enriched]="--config.attributes.enrich_queries=True"
  [agcl_true_enriched]="--config.attributes.source=true --config.attributes.enrich_queries=True"
  [agcl_sft_enriched]="--config.attributes.source=${SFT_ATTRIBUTES:-} --config.attributes.enrich_queries=True"
  [agcl_rar_enriched]="--config.attributes.source=${RAR_ATTRIBUTES:-} --config.attributes.enrich_queries=True"
  # Mined hard negatives (docs/mining.md): MINED (default below) on top of the arm's loss.
  [infonce_mined]="--config.loss.bias_scale=0 ${MINED}"
  [uniform_margin_mined]="--config.loss.uniform_margin=${MARGIN} ${MINED}"
  [agcl_mined]="${MINED}"
  [agcl_published_mined]="--config.loss.bias_scale=1 --config.loss.bm25_norm=none --config.loss.bias_on=all ${MINED}"
  [agcl_mined_attribute_filter]="${MINED} --config.mining.filter=attribute"
  [agcl_mined_score_filter]="${MINED} --config.mining.filter=score"
)
DEFAULT_ARMS="infonce agcl agcl_published uniform_margin agcl_mask_margin agcl_mask_attribute agcl_mask_positive agcl_family_mixed infonce_family_mixed agcl_no_duplicates infonce_no_duplicates infonce_enriched agcl_enriched"
ARMS=${3:-$DEFAULT_ARMS}
CACHE="${OUT}/data_cache"  # one catalog for every run (the no-duplicates arms build their own)

for seed in ${SEEDS}; do
  for arm in ${ARMS}; do
    if [[ -z "${ARM_FLAGS[$arm]+x}" ]]; then echo "unknown arm '$arm'; known: ${!ARM_FLAGS[*]}" >&2; exit 2; fi
    dir="${OUT}/${arm}/seed${seed}"
    if [[ -f "${dir}/summary.json" ]] && grep -q '"eval"' "${dir}/summary.json"; then continue; fi
    mkdir -p "${OUT}/${arm}"
    echo "=== ${arm} seed ${seed} -> ${dir}"
    # shellcheck disable=SC2086
    "${PYTHON}" -m afmrl_jax.main --config="configs/stage1.py:${PRESET}" --workdir="${dir}" \
      --config.catalog.cache_dir="${CACHE}" --config.model.param_seed="${seed}" \
      --config.pipeline.seed="${seed}" \
      --config.eval.report=False ${STEPS_FLAG} ${ARM_FLAGS[$arm]} ${EXTRA} > "${dir}.log" 2>&1 \
      || { echo "run failed, see ${dir}.log" >&2; tail -5 "${dir}.log" >&2; }
  done
done
# shellcheck disable=SC2086
"${PYTHON}" launch/ablate_report.py "${OUT}" --baseline "${BASELINE:-infonce}" --pairs ${PAIRS:-} \
  --json "${OUT}/ablation.json" | tee "${OUT}/ablation.md"
