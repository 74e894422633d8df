/* IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: not yet implemented in this build (the table is empty, so the Python layer
 * reports these formats as having no kernel). */
#include "moeplan.h"

const mp_format mp_formats_iq[] = {
    MP_FORMAT_END,
};
