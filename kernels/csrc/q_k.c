/* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: not yet implemented in this build (the table is empty, so the Python layer
 * reports these formats as having no kernel). */
#include "moeplan.h"

const mp_format mp_formats_k[] = {
    MP_FORMAT_END,
};
