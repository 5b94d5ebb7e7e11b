"""Plugin-defined metrics: define, increment, record, get (Envoy's semantics)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import MetricType, Status
from . import hostcall
from ._util import OK, read_str

if TYPE_CHECKING:
    from ..vm import WasmVM


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


@hostcall("proxy_define_metric", "iiii")
def proxy_define_metric(vm: WasmVM, metric_type: int, name_ptr: int, name_len: int,
                        ret_id: int) -> int:
    if metric_type > MetricType.HISTOGRAM:
        return Status.BAD_ARGUMENT
    name = read_str(vm, name_ptr, name_len)
    vm.memory.check(ret_id, 4)
    metric = vm.plugin.host.metric_store.define(MetricType(metric_type), name)
    vm.memory.write_u32(ret_id, vm.metric_ids.add(metric))
    return OK


@hostcall("proxy_increment_metric", "iI")
def proxy_increment_metric(vm: WasmVM, metric_id: int, offset: int) -> int:
    metric = vm.metric_ids.get(metric_id)
    if metric is None:
        return Status.NOT_FOUND
    return vm.plugin.host.metric_store.increment(metric, _signed64(offset))


@hostcall("proxy_record_metric", "iI")
def proxy_record_metric(vm: WasmVM, metric_id: int, value: int) -> int:
    metric = vm.metric_ids.get(metric_id)
    if metric is None:
        return Status.NOT_FOUND
    return vm.plugin.host.metric_store.record(metric, value)


@hostcall("proxy_get_metric", "ii")
def proxy_get_metric(vm: WasmVM, metric_id: int, ret_value: int) -> int:
    metric = vm.metric_ids.get(metric_id)
    if metric is None:
        return Status.NOT_FOUND
    if metric.type == MetricType.HISTOGRAM:
        return Status.BAD_ARGUMENT
    vm.memory.write_u64(ret_value, vm.plugin.host.metric_store.get(metric))
    return OK
