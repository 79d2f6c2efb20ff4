"""ms-swift plugin: ``swift sft ... --external_plugins THIS_FILE --callbacks safepoint``.

Registers ``safepoint`` in ``swift.callbacks.callbacks_map``; see ``safepoint.integrations.swift``.
The path: ``python -m safepoint.integrations.swift plugin``.
"""

from safepoint.integrations.swift import register

register()
