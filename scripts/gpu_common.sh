# Sourced by gpu_check.sh and gpu_prepare.sh (`. scripts/gpu_common.sh "$@"`): what both must
# agree on, the inputs carried to a GPU machine, and how both take their settings.

# under ../shared (or IGKD_SHARED), and under .gpu-carry/shared on a machine without it
GPU_ARCHIVE=data/cifar10-jpg.tar.gz  # the JPEG CIFAR-10
GPU_TEACHER=checkpoints/nordlinglab/CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt

# settings come from the environment; the calling script's header comment is its --help
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,/^set -/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0;;
  *) echo "$(basename "$0"): takes no arguments, only environment settings, got '$1' (--help lists them)" >&2; exit 2;;
esac
