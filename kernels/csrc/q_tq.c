/* TQ1_0, TQ2_0: not yet implemented in this build (the table is empty, so the Python layer
 * reports these formats as having no kernel). */
#include "moeplan.h"

const mp_format mp_formats_tq[] = {
    MP_FORMAT_END,
};
