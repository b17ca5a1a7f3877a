#!/usr/bin/env bash
# Mutation testing (mutmut 3) of one module against the few test files that cover it. Not in CI: slow.
#   bash scripts/mutation.sh MODULE [--rev REV [--new-tests]] [--mutants "NAME ..."]
#     MODULE       losses | objectives | loop | pth_merge | formats | rwkv7 | routes | thin_check | precision |
#                  linear_ce | fused_lora | rowsplit | timemix | pointwise | cpu | checkpoint | dispatch |
#                  verify | ops_entry | memory | optim | sampling | binidx | dataset | dataset_make | schedule |
#                  build | records | data_build | tokenizer | preference | model_io | model_config | inits |
#                  sampler | grpo_loss | run_dir | model_init | interrupts
#                  (the map below)
#     --rev        the tree (code and tests) of a commit (git archive REV) instead of the working tree
#     --new-tests  with --rev: the map's test_mut_*.py files from the working tree too (REV's code, today's tests)
#     --mutants    only these mutants (mutmut names or globs, e.g. the survivors of an earlier run)
# Needs `pip install -e ".[mutation]"`. Works in .mutation/MODULE/ (a copy of the tree; mutmut's own copy of it is
# .mutation/MODULE/mutants/), never in the checkout, so other work in the checkout is undisturbed. Prints the count
# per verdict and every surviving mutant; `cd .mutation/MODULE && mutmut show NAME` shows one mutant's diff.
# One test process at a time (--max-children 1), one torch thread, under nice: it shares the machine.
# See docs/mutation.md for the results and the survivors that are equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

module="${1:-}"
shift || true
rev="" new_tests=0 only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --rev) rev="$2"; shift 2 ;;
        --new-tests) new_tests=1; shift ;;
        --mutants) only="$2"; shift 2 ;;
        *) echo "error: unknown argument $1" >&2; exit 2 ;;
    esac
done

# module -> (source file, tests, mutant-name globs or "" for every function). Each mutant runs only the
# listed tests that call the mutated function; keep the lists small: each surviving mutant runs all of them.
globs=""
case "$module" in
    losses)
        src=peft_rwkv7/train/losses.py
        tests="tests/train/test_infctx.py tests/train/test_weight_decay.py
               tests/train/test_preference_oracle.py::test_sequence_logps_equal_the_rwkv_package
               tests/train/test_preference_train.py::test_muon_takes_the_hidden_matrices_and_adamw_the_rest
               tests/train/test_mut_losses.py" ;;
    objectives)
        src=peft_rwkv7/train/objectives.py
        tests="tests/train/test_objectives.py tests/train/test_mut_objectives.py" ;;
    loop)
        # the loss and gradient path: the token-mean loss over the global batch and its gradient scale, the bf16
        # autocast, the sum over ranks; train_step (68 more mutants, ~25 min) with --mutants "*.x_train_step__mutmut_*".
        # Not setup (194): each mutant of loop runs training runs (~20 s each on a shared 2-core machine).
        src=peft_rwkv7/train/loop.py
        globs="*.x__sft_backward__mutmut_* *.x__sum_over_ranks__mutmut_* *.x__precision_context__mutmut_*"
        tests="tests/train/test_batch_split.py::test_micro_batches_and_accumulation_give_one_update
               tests/train/test_precision.py::test_bf16_with_train_parts_trains_and_evaluates
               tests/train/test_preference_train.py::test_micro_batches_and_accumulation_give_one_update
               tests/train/test_mut_loop.py" ;;
    pth_merge)
        # the merge arithmetic; merge_into_pth, export_rwkv_peft and their summary lines with
        # --mutants "*.x__describe__mutmut_* *.x_merge_into_pth__mutmut_* *.x_export_rwkv_peft__mutmut_*"
        src=peft_rwkv7/adapters/pth_merge.py
        globs="*.x__is_quantized__mutmut_* *.x_merged_weight__mutmut_* *.x_merged_state_dict__mutmut_*"
        tests="tests/adapters/test_merge.py tests/adapters/test_mut_pth_merge.py tests/adapters/test_peft_kinds.py
               tests/adapters/test_export_eval.py tests/adapters/test_mut_pth_merge_lines.py" ;;
    formats)
        src=peft_rwkv7/data/formats.py
        tests="tests/data/test_formats.py tests/data/test_sharegpt.py tests/data/test_mut_formats.py" ;;
    rwkv7)
        # the forward computation; the constructors (222 more, ~8 min) with --mutants "*ǁ__init____mutmut_*"
        src=peft_rwkv7/model/rwkv7.py
        globs="*.x__shift__mutmut_* *ǁforward__mutmut_* *ǁinitial_state__mutmut_* *ǁstep__mutmut_*"
        tests="tests/model/test_parity.py tests/model/test_state.py tests/model/test_mut_rwkv7.py" ;;
    routes)
        # a run's measured choices (issue 23): made once by rank 0, kept in checkpoints, taken back at a resume
        src=peft_rwkv7/train/routes.py
        tests="tests/train/test_routes.py tests/train/test_mut_routes.py
               tests/ops/test_precision_auto.py::test_a_resumed_auto_run_goes_on_in_the_precision_it_began_in" ;;
    thin_check)
        # which of LoRA's fp32 thin products run in the CPU kernel: the measurement, its cache and its verdict
        src=peft_rwkv7/ops/thin_check.py
        tests="tests/ops/test_thin_check.py tests/ops/test_mut_thin_check.py" ;;
    precision)
        # precision: auto's bf16 check on the CPU (measured, cached per machine) and the choice from it
        src=peft_rwkv7/ops/precision.py
        tests="tests/ops/test_precision_auto.py tests/ops/test_mut_precision.py
               tests/ops/test_precision_isa.py::test_a_library_isa_cap_is_part_of_the_cache_key" ;;
    linear_ce)
        # the head and loss over row chunks (issue 23): never all logits at once, the same loss and gradients
        src=peft_rwkv7/ops/linear_ce.py
        tests="tests/ops/test_linear_ce.py tests/ops/test_loss_cpu.py tests/train/test_fused_loss.py
               tests/ops/test_mut_linear_ce.py" ;;
    fused_lora)
        # LoRA's layer as one autograd node (issue 23): its thin products, its sum, its backward
        src=peft_rwkv7/adapters/fused_lora.py
        tests="tests/adapters/test_fused_lora.py tests/adapters/test_mut_fused_lora.py
               tests/ops/test_rowsplit.py::test_the_model_and_the_lora_layer_take_row_chunks" ;;
    rowsplit)
        # bf16 products in row chunks where oneDNN runs them on one thread (issue 23)
        src=peft_rwkv7/ops/rowsplit.py
        tests="tests/ops/test_rowsplit.py tests/ops/test_mut_rowsplit.py" ;;
    timemix)
        # TimeMix's fused element-wise ops: which inputs take them, their dtypes, their Functions (issue 23), and the
        # torch references (a GPU's path and the tests' oracle). Not `_ext` (the op's name for an error message)
        src=peft_rwkv7/ops/timemix.py
        globs="*ǁforward__mutmut_* *ǁbackward__mutmut_* *.x_token_mix__mutmut_* *.x_key_prep__mutmut_*
               *.x_wkv_output__mutmut_* *.x_bias_sigmoid__mutmut_* *.x_value_residual__mutmut_*
               *.x_fused_available__mutmut_* *.x__result_dtype__mutmut_* *.x__params__mutmut_* *_reference__mutmut_*"
        tests="tests/ops/test_timemix.py tests/ops/test_gates.py tests/ops/test_mut_timemix.py" ;;
    pointwise)
        # relu^2 in one pass each way (issue 23)
        src=peft_rwkv7/ops/pointwise.py
        tests="tests/ops/test_pointwise.py tests/ops/test_mut_pointwise.py" ;;
    checkpoint)
        # one process's checkpoints (exact resume; issue 23 keeps a run's measured choices in them): what a
        # checkpoint holds, which one a resume takes, what it refuses. Not DeepSpeed's (their tests start processes)
        src=peft_rwkv7/train/checkpoint.py
        globs="*.x_rng_state__mutmut_* *.x_set_rng_state__mutmut_*
               *.x_has_checkpoint__mutmut_* *.x__prune__mutmut_* *.x_save_checkpoint__mutmut_* *.x__newest_record__mutmut_*
               *.x_saved_choices__mutmut_* *.x_load_latest_checkpoint__mutmut_* *.x__check_params__mutmut_*
               *.x__check_extra__mutmut_* *.x_restore__mutmut_* *.x__full_shape__mutmut_* *.x__read_meta__mutmut_*
               *.x_resume__mutmut_*"
        tests="tests/train/test_resume.py tests/train/test_routes.py tests/train/test_mut_routes.py
               tests/train/test_mut_checkpoint.py" ;;
    cpu)
        # the CPU kernels' Python side (issue 23): the WKV autograd Function and its staging, the thin products' and
        # matvec's routes, the one-token step, fp64 log-sum-exp. The block cache's switches and the build's flags (54
        # more, against a fake extension) with --mutants "*.x_*block*__mutmut_* *.x__build_flags__mutmut_*"
        src=peft_rwkv7/ops/cpu.py
        globs="*.x_kernel_threads__mutmut_* *.x_is_available__mutmut_* *.x__forward__mutmut_* *.x__backward__mutmut_*
               *.x__backward_state__mutmut_* *.x__rows__mutmut_* *.x__fp32__mutmut_* *.x__pad_square__mutmut_*
               *ǁforward__mutmut_* *ǁbackward__mutmut_* *.x_wkv7_cpu__mutmut_* *.x_matvec__mutmut_*
               *.x_vecmat__mutmut_* *.x__thin_ext__mutmut_* *.x_thin_takes__mutmut_* *.x_thin_nt__mutmut_*
               *.x_thin_tn__mutmut_* *.x_logsumexp_f64__mutmut_* *.x_wkv7_step_cpu__mutmut_* *.x__empty__mutmut_*"
        tests="tests/ops/test_cpu_backend.py tests/ops/test_thin.py tests/ops/test_matvec.py
               tests/adapters/test_rnn_step.py tests/infer/test_longctx.py tests/ops/test_loss_cpu.py
               tests/ops/test_decay.py tests/ops/test_mut_cpu.py tests/ops/test_mut_cpu_cache.py" ;;
    dispatch)
        # which WKV kernel a call gets (issue 23's speed rests on it): auto's order per device, the first-use check's
        # verdict cached per (backend, head size, dtype, device type), the fall-back to the reference
        src=peft_rwkv7/ops/dispatch.py
        tests="tests/ops/test_verify.py tests/ops/test_mut_dispatch.py" ;;
    verify)
        # the first-use check itself: the problem, every output and gradient compared, the tolerance per dtype
        src=peft_rwkv7/ops/verify.py
        tests="tests/ops/test_verify.py tests/ops/test_mut_dispatch.py" ;;
    ops_entry)
        # ops/__init__.py: wkv7's input checks and dtype, the decay from z, one-row products and the one-token step
        src=peft_rwkv7/ops/__init__.py
        tests="tests/ops/test_cpu_backend.py tests/ops/test_matvec.py tests/ops/test_decay.py tests/ops/test_rowsplit.py
               tests/adapters/test_rnn_step.py tests/ops/test_mut_dispatch.py" ;;
    memory)
        # where a CPU run's memory comes from (issue 23, rounds 7 and 10): glibc kept from unmapping and trimming,
        # the block cache around each step, given up where shapes change, closed at the run's end
        src=peft_rwkv7/train/memory.py
        tests="tests/train/test_memory.py tests/train/test_block_cache.py tests/train/test_mut_memory.py" ;;
    optim)
        # the run's optimizer: fused AdamW, Muon beside AdamW as one optimizer, LoRA+'s groups, DeepSpeed's CPU Adam
        src=peft_rwkv7/train/optim.py
        tests="tests/train/test_lora_plus.py tests/train/test_weight_decay.py
               tests/train/test_preference_train.py::test_muon_takes_the_hidden_matrices_and_adamw_the_rest
               tests/train/test_mut_optim.py" ;;
    sampling)
        # which sample each step reads (exact resume rests on it): get's windows, pad's pieces, each epoch's order and
        # data.group_by_length's grouping (issue 23, round 6: less padding run)
        src=peft_rwkv7/data/sampling.py
        tests="tests/data/test_sampling.py tests/data/test_group_by_length.py tests/data/test_mut_sampling.py" ;;
    binidx)
        # Megatron's .bin/.idx pairs, read and written as RWKV-LM's trainer does
        src=peft_rwkv7/data/binidx.py
        tests="tests/data/test_binidx.py tests/data/test_mut_binidx.py tests/data/test_dead_temps.py" ;;
    dataset)
        # the samples a step reads: TrainData's windows and pieces, their labels under the loss mask, the batch of a
        # rank, documents held out for evaluation, the cache's reopening and the vocabulary scan. Not make_dataset,
        # resolve_format and _sft_format (~400 mutants, each running tokenizer builds: left out for time)
        src=peft_rwkv7/data/dataset.py
        globs="*ǁTrainDataǁ* *.x_eval_count__mutmut_* *.x__held_out_choice__mutmut_* *.x__held_out_docs__mutmut_*
               *.x__without__mutmut_* *.x__hold_out_pairs__mutmut_* *.x__open_cached__mutmut_* *.x__check_vocab__mutmut_*"
        tests="tests/data/test_dataset.py tests/data/test_sampling.py tests/data/test_group_by_length.py
               tests/train/test_eval_split.py" ;;
    dataset_make)
        # what a recipe's data section turns into: the format guessed from the path and the first record (sft fields
        # from the known pairs), the token cache's key and reuse, the vocabulary check's trigger, the sampling chosen
        # by kind, documents held out. Not test_eval_split's tests that train (~90 s)
        src=peft_rwkv7/data/dataset.py
        globs="*.x_make_dataset__mutmut_* *.x_resolve_format__mutmut_* *.x__sft_format__mutmut_*
               *.x_file_digest__mutmut_* *.x__record_where__mutmut_*"
        tests="tests/data/test_dataset.py tests/data/test_cache_build.py tests/data/test_sharegpt.py
               tests/data/test_preference.py tests/data/test_group_by_length.py tests/data/test_formats.py
               tests/data/test_mut_dataset.py
               tests/train/test_eval_split.py::test_held_out_documents_leave_the_training_stream
               tests/train/test_eval_split.py::test_masked_data_hold_out_whole_documents_with_their_loss_masks
               tests/train/test_eval_split.py::test_an_explicit_eval_split_of_sft_data
               tests/train/test_eval_split.py::test_preference_data_hold_out_pairs
               tests/train/test_eval_split.py::test_too_few_documents_to_hold_out_say_so_in_the_summary
               tests/data/test_mut_dataset_make.py" ;;
    schedule)
        # the learning rate of each step and its share per param group
        src=peft_rwkv7/train/schedule.py
        tests="tests/train/test_schedule.py tests/train/test_lora_plus.py tests/train/test_mut_schedule.py" ;;
    build)
        # the kernels' first-run compile and its cache: the build key, the marker, the OS lock several processes
        # share, the private temp folder. test_build.py's five tests that compile in child processes (~60 s) are
        # left out for time (and mutmut cannot see what a child process calls)
        src=peft_rwkv7/ops/build.py
        tests="tests/ops/test_build_notice.py tests/ops/test_build.py::test_builds_find_the_interpreters_own_tools
               tests/ops/test_build.py::test_each_installed_package_builds_its_own_and_copies_of_a_source_share_one
               tests/ops/test_build.py::test_only_the_binding_source_includes_torchs_python_headers
               tests/ops/test_mut_build.py tests/ops/test_mut_build_lock.py" ;;
    records)
        # reading every user data file record by record (.jsonl, .json arrays and JSON Lines, .parquet): the BOM, blank
        # lines, the line numbers and every one-line refusal that names the file and line
        src=peft_rwkv7/data/records.py
        tests="tests/data/test_cache_build.py tests/data/test_formats.py tests/data/test_sharegpt.py
               tests/data/test_dataset.py tests/data/test_binidx.py tests/test_cli_inputs.py tests/infer/test_eval_chat.py
               tests/data/test_mut_records.py" ;;
    data_build)
        # `rwkv-peft data build` and the token cache's tokenizing: chunks in order on worker processes, the loss mask
        # file beside the pair, nothing renamed into place before the whole input succeeded
        src=peft_rwkv7/data/build.py
        tests="tests/data/test_cache_build.py tests/data/test_binidx.py tests/data/test_dataset.py
               tests/data/test_mut_data_build.py" ;;
    tokenizer)
        # the World tokenizer (pyrwkv-tokenizer, checked against RWKV's trie) and tokenizer.json files
        src=peft_rwkv7/data/tokenizer.py
        tests="tests/data/test_tokenizer.py tests/data/test_formats.py tests/data/test_mut_tokenizer.py" ;;
    preference)
        # preference pairs (DPO/ORPO/SimPO): each side's rendering and loss mask, the pairs a step reads, their cache
        src=peft_rwkv7/data/preference.py
        tests="tests/data/test_preference.py tests/data/test_group_by_length.py tests/data/test_mut_dataset_make.py
               tests/train/test_eval_split.py::test_preference_data_hold_out_pairs tests/data/test_mut_preference.py" ;;
    model_io)
        # every model a user loads or writes: .pth read (mmap, legacy, damaged), the config from key shapes, a
        # trained state kept, weights made in the load dtype, atomic writes under the umask, the device choice
        src=peft_rwkv7/model/io.py
        tests="tests/model/test_io.py tests/model/test_formats.py tests/model/test_state.py tests/model/test_formats_hf.py
               tests/model/test_mut_model_io.py" ;;
    model_config)
        # a model's shape from its checkpoint's keys, and the one-line refusals of RWKV-4/5/6 and damaged files
        src=peft_rwkv7/model/config.py
        tests="tests/model/test_io.py tests/model/test_formats.py tests/model/test_mut_model_io.py
               tests/model/test_mut_model_config.py tests/model/test_damaged_models.py" ;;
    inits)
        # OLoRA, LoftQ and EVA starts (checked against HF peft and bitsandbytes), EVA's calibration inputs
        src=peft_rwkv7/adapters/inits.py
        tests="tests/adapters/test_inits.py tests/train/test_adalora_eva.py tests/adapters/test_mut_inits.py" ;;
    sampler)
        # GRPO's rollouts: each group's tokens, the sampling distribution and its log-probabilities, stops, the mask
        src=peft_rwkv7/infer/sampler.py
        tests="tests/infer/test_sampler.py tests/infer/test_padding_rows.py tests/infer/test_mut_sampler.py" ;;
    grpo_loss)
        # GRPO's advantages and clipped objective (TRL's loss types and scales), its group-size checks
        src=peft_rwkv7/train/grpo_loss.py
        tests="tests/train/test_grpo_loss.py tests/train/test_mut_grpo_loss.py" ;;
    run_dir)
        # a run directory's checkpoints, its end marker, a killed run's temp files, log.jsonl read at any moment
        src=peft_rwkv7/run_dir.py
        tests="tests/train/test_run_end.py tests/ui/test_run_status.py tests/train/test_resume.py
               tests/infer/test_inspect_damaged.py tests/train/test_mut_checkpoint.py tests/train/test_mut_run_dir.py" ;;
    model_init)
        # a fresh model's start (pretraining from scratch), as RWKV-LM's trainer draws it
        src=peft_rwkv7/model/init.py
        tests="tests/model/test_init.py" ;;
    interrupts)
        # Ctrl-C held over a checkpoint's save and over a command's torch import, taken at the block's end
        src=peft_rwkv7/interrupts.py
        tests="tests/test_interrupts.py" ;;
    *)
        echo "usage: bash scripts/mutation.sh MODULE [--rev REV [--new-tests]] [--mutants 'NAME ...']" >&2
        echo "  MODULE: losses objectives loop pth_merge formats rwkv7 routes thin_check precision" \
             "linear_ce fused_lora rowsplit timemix pointwise cpu checkpoint dispatch verify ops_entry memory optim" \
             "sampling binidx dataset dataset_make schedule build records data_build tokenizer preference" \
             "model_io model_config inits sampler grpo_loss run_dir model_init interrupts" >&2
        exit 2 ;;
esac

py=$(command -v python3)
[ -x .venv/bin/python ] && py=$root/.venv/bin/python
mutmut=$(dirname "$py")/mutmut
[ -x "$mutmut" ] || { echo "error: mutmut is not installed: pip install -e '.[mutation]'" >&2; exit 2; }

# Every run starts afresh from a copy of the tree: mutmut's incremental mode would keep old verdicts after tests change.
work=$root/.mutation/$module
rm -rf "$work" && mkdir -p "$work"
if [ -n "$rev" ]; then
    git archive "$rev" | tar -x -C "$work"
    if [ "$new_tests" = 1 ]; then
        for f in $tests; do
            case "$f" in */test_mut_*) [ -e "$f" ] && cp "$f" "$work/$f" ;; esac
        done
    fi
else
    git ls-files -z --cached --others --exclude-standard | tar --null --no-recursion --ignore-failed-read -c -T - | tar -x -C "$work"
fi
for f in $tests; do  # test files of this map that do not exist (yet) are left out
    [ -e "$work/${f%%::*}" ] || tests=$(echo "$tests" | tr -s ' \n' '\n\n' | grep -vxF "$f" || true)
done
[ -n "$only" ] && globs=$only
# the tests' third-party data (tests/conftest.SHARED_DATA: ../shared/data beside the tree, which for mutmut's copy in
# $work/mutants is $work/shared): without it, the tests that read it skip and their mutants count as "no tests"
[ -d "$root/../shared/data" ] && ln -sfn "$(cd "$root/../shared" && pwd)" "$work/shared"
cd "$work"

# mutmut skips decorated functions (@torch.no_grad(), @property, ...): lift such decorators to an assignment
# after the function (`f = dec(f)`, the same object as before) so that the function itself is mutated.
"$py" - "$src" <<'EOF'
import sys

import libcst as cst

KEEP = {"staticmethod", "classmethod", "overload"}  # mutmut handles the first two; overload stubs stay stubs


def name_of(dec):
    d = dec.decorator.func if isinstance(dec.decorator, cst.Call) else dec.decorator
    return d.attr.value if isinstance(d, cst.Attribute) else getattr(d, "value", "")


def lift(body):
    out = []
    for stmt in body:
        if isinstance(stmt, cst.ClassDef) and isinstance(stmt.body, cst.IndentedBlock):
            stmt = stmt.with_changes(body=stmt.body.with_changes(body=lift(stmt.body.body)))
        if isinstance(stmt, cst.FunctionDef) and stmt.decorators and not {name_of(d) for d in stmt.decorators} & KEEP:
            call = stmt.name.value
            for dec in reversed(stmt.decorators):
                call = f"{cst.Module([]).code_for_node(dec.decorator)}({call})"
            out += [stmt.with_changes(decorators=[]), cst.parse_statement(f"{stmt.name.value} = {call}\n")]
        else:
            out.append(stmt)
    return out


path = sys.argv[1]
mod = cst.parse_module(open(path).read())
open(path, "w").write(mod.with_changes(body=lift(mod.body)).code)
EOF

# Each mutant is a fresh pytest session, so session fixtures are rebuilt per mutant. The rwkv package's trie (the
# tokenizer oracle of the data and preference tests: pure Python, 5 s to build, read-only) is built once, in the
# process mutmut forks the test runs from, by this plugin; what it encodes is unchanged.
cat > mutation_memo.py <<'PLUGIN'
"""Loaded by scripts/mutation.sh with -p: one rwkv.rwkv_tokenizer.TRIE_TOKENIZER per vocabulary file per process."""
import functools
from pathlib import Path

import rwkv
import rwkv.rwkv_tokenizer as _t

_Trie = _t.TRIE_TOKENIZER


@functools.cache
def _built(file_name: str):
    return _Trie(file_name)


class _SharedTrie(_Trie):
    def __new__(cls, file_name):  # an instance of the base class, so Python does not run __init__ again
        return _built(str(file_name))


_t.TRIE_TOKENIZER = _SharedTrie
_built(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
PLUGIN

toml_list() { printf '"%s", ' "$@" | sed 's/, $//'; }
# shellcheck disable=SC2086
cat >> pyproject.toml <<EOF

[tool.mutmut]
source_paths = ["peft_rwkv7"]
only_mutate = ["$src"]
pytest_add_cli_args_test_selection = [$(toml_list $tests)]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "mutation_memo", "-W", "ignore::DeprecationWarning"]
# links in the package (kernels -> cuda/, recipes -> recipes/) are copied as folders; tests read data/ and recipes/
also_copy = ["peft_rwkv7/ops/kernels", "peft_rwkv7/recipes", "cuda", "recipes", "data", "README.md", "mutation_memo.py"]
process_isolation = "forkserver"
use_git_change_detection = false
EOF

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0
# A mutant that drops a test's cache folder writes to the default one under ~ (the data cache, ~/.cache/rwkv-peft):
# the run gets a home of its own, and keeps the real kernel cache (built kernels and the measured checks beside them).
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$py" -c 'from peft_rwkv7.ops.build import extensions_root
print(extensions_root())')}
export TORCH_EXTENSIONS_DIR HOME=$work/home
mkdir -p "$HOME"
echo "mutating $src with: $(echo $tests)${globs:+ (mutants: $(echo $globs))}; log: $work/mutmut.log"
start=$(date +%s)
# shellcheck disable=SC2086
rc=0
nice -n 10 "$mutmut" run --max-children 1 $globs > mutmut.log 2>&1 || rc=$?
elapsed=$(( $(date +%s) - start ))
if [ "$rc" != 0 ] || [ ! -s "mutants/$src.meta" ]; then
    tr '\r' '\n' < mutmut.log | tail -n 40
    echo "error: mutmut failed (exit $rc; see above and $work/mutmut.log)" >&2
    exit 1
fi

"$py" - "$src" "$elapsed" $globs <<'EOF'
import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

src, elapsed, globs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
codes = json.loads(Path(f"mutants/{src}.meta").read_text())["exit_code_by_key"]
codes = {k: v for k, v in codes.items() if not globs or any(fnmatch.fnmatch(k, g) for g in globs)}
status = {k: status_by_exit_code[v] for k, v in codes.items()}
count = Counter(status.values())
caught = count["killed"] + count["timeout"]
print(f"\n{src}: {len(status)} mutants, {count['killed']} killed, {count['timeout']} timeout, "
      f"{count['survived']} survived, {count['no tests']} no tests, "
      f"other {len(status) - caught - count['survived'] - count['no tests']}"
      f" -> caught {caught}/{len(status)} = {caught / max(len(status), 1):.1%} in {elapsed} s")
for k in sorted(status):
    if status[k] not in ("killed", "timeout"):
        print(f"  {status[k]}: {k}")
EOF
