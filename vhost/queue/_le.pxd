# cython: language_level=3
"""What the compiled cores (``vhost.queue._split_core``, ``vhost.queue._packed_core``,
``virtio_blk._fastpath_core``) share: the little-endian field accesses and memory-order
primitives of rings and in-flight areas, the CPython calls they use on views and ints, and the
exact-int test of their plain-case checks -- stated once here and cimported.

Fields are read and written with ``memcpy`` (unaligned-safe: a guest may place a ring or a
descriptor table anywhere) in host order, so the build refuses a big-endian host.  The fields
the driver reads or writes concurrently (``avail.idx``, ``used.idx``, the event indices, the
io_uring indices) are single atomic accesses with the order each use needs, and
:func:`full_fence` is the store->load fence between publishing and re-reading (virtio 1.x
2.7.10).
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
    #error "the compiled cores access little-endian ring and area fields with host loads and stores"
    #endif
    static inline uint16_t vle_get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    static inline uint32_t vle_get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    static inline uint64_t vle_get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
    static inline void vle_put_u16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
    static inline void vle_put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
    static inline void vle_put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
    static inline void vle_release_u8(uint8_t *p, uint8_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void vle_release_u16(uint8_t *p, uint16_t v) {
        __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
    }
    static inline void vle_store_u16(uint16_t *p, uint16_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELAXED);
    }
    static inline uint16_t vle_load_u16(const uint16_t *p) {
        return __atomic_load_n(p, __ATOMIC_RELAXED);
    }
    static inline uint16_t vle_load_acquire_u16(const uint8_t *p) {
        return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
    }
    static inline uint32_t vle_load_acquire_u32(const uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void vle_store_release_u32(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void vle_full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
    """
    # Plain field accesses (the device's own fields, or fields the driver no longer writes).
    uint16_t get_u16 "vle_get_u16"(const uint8_t *p) nogil
    uint32_t get_u32 "vle_get_u32"(const uint8_t *p) nogil
    uint64_t get_u64 "vle_get_u64"(const uint8_t *p) nogil
    void put_u16 "vle_put_u16"(uint8_t *p, uint16_t v) nogil
    void put_u32 "vle_put_u32"(uint8_t *p, uint32_t v) nogil
    void put_u64 "vle_put_u64"(uint8_t *p, uint64_t v) nogil
    # Commit stores: what was written before is visible before these are.
    void release_u8 "vle_release_u8"(uint8_t *p, uint8_t v) nogil
    void release_u16 "vle_release_u16"(uint8_t *p, uint16_t v) nogil
    void store_release_u32 "vle_store_release_u32"(uint32_t *p, uint32_t v) nogil
    # Fields shared with the driver: one access each, neither torn nor cached.
    void store_u16 "vle_store_u16"(uint16_t *p, uint16_t v) nogil
    uint16_t load_u16 "vle_load_u16"(const uint16_t *p) nogil
    uint16_t load_acquire_u16 "vle_load_acquire_u16"(const uint8_t *p) nogil
    uint32_t load_acquire_u32 "vle_load_acquire_u32"(const uint32_t *p) nogil
    void full_fence "vle_full_fence"() nogil

cdef extern from "Python.h":
    ctypedef struct Py_buffer:
        void *buf
        Py_ssize_t len
        int readonly
    Py_buffer *PyMemoryView_GET_BUFFER(object)
    bint PyLong_CheckExact(object)
    bint PyTuple_CheckExact(object)
    bint PyList_CheckExact(object)
    bint PyBytes_CheckExact(object)
    bint PyByteArray_CheckExact(object)
    long long PyLong_AsLongLongAndOverflow(object, int *overflow) except? -1
    char *PyBytes_AS_STRING(object)
    Py_ssize_t PyBytes_GET_SIZE(object)
    char *PyByteArray_AS_STRING(object)
    Py_ssize_t PyByteArray_GET_SIZE(object)


cdef inline bint small_int(object obj, long long *out):
    """``obj`` is an exact int that fits a long long (then in ``*out``): the plain case the
    compiled loops take; anything else is left to the Python code, which states every fault."""
    cdef int overflow = 0
    if not PyLong_CheckExact(obj):
        return False
    out[0] = PyLong_AsLongLongAndOverflow(obj, &overflow)
    return not overflow
