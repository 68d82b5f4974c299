#!/usr/bin/env bash
# Make this checkout importable on the lent GPU host without pip/network: link the four packages
# into a site dir on PYTHONPATH and write a dist-info whose entry_points.txt registers the
# vllm.general_plugins entry point (what `pip install` does). Usage: source scripts/device_install.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SITE=/tmp/kakeya-site
mkdir -p $SITE/kakeya_kv_dev-0.0.dist-info
ln -sfn $ROOT/kakeya_kv $SITE/kakeya_kv
ln -sfn $ROOT/kernels $SITE/kakeya_kernels
ln -sfn $ROOT/calibration $SITE/kakeya_calibration
ln -sfn $ROOT/vllm_backend/kakeya_v1_3_ppl $SITE/kakeya_v1_3_ppl
printf 'Metadata-Version: 2.1\nName: kakeya-kv-dev\nVersion: 0.0\n' > $SITE/kakeya_kv_dev-0.0.dist-info/METADATA
printf '[vllm.general_plugins]\nkakeya = kakeya_v1_3_ppl:register\n' > $SITE/kakeya_kv_dev-0.0.dist-info/entry_points.txt
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
