/* Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: not yet implemented in this build (the table is empty, so the Python layer
 * reports these formats as having no kernel). */
#include "moeplan.h"

const mp_format mp_formats_legacy[] = {
    MP_FORMAT_END,
};
