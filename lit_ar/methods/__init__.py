"""Generation methods: each file holds one method's training draw and sampling loop in plain torch, over a core
(lit_ar.models), a head and a guidance object. See docs/adding_a_method.md."""
